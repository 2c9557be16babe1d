"""cuda_mma's CUDA C++ compiles with NVRTC for sm_80 and sm_90, on the CPU, without register spills.

The kernel is compiled at first use on the GPU, so a compile error or a variant whose registers spill
to local memory (several times slower) would otherwise show only on a card. Here every variant the
dispatch can launch (the default per column-tile count NT = 1..8, i.e. 1..64 token rows, and every
entry of the measured table ``cuda_mma.TUNED``) is compiled for both architectures and both dtypes with
``--ptxas-options=-v``, and ptxas's report is read: no spill stores, no spill loads. NVRTC comes from
the ``nvidia-cuda-nvrtc`` wheel (requirements/current.txt); skipped where no libnvrtc loads.
"""

from __future__ import annotations

import re

import pytest
import torch

from nvfp4_fix.kernels import cuda_mma, nvrtc

try:
    nvrtc.nvrtc()
except nvrtc.CudaError as err:  # pragma: no cover - depends on the environment
    pytest.skip(f"no NVRTC: {err}", allow_module_level=True)

ARCHS = ("sm_80", "sm_90")


def _launchable() -> list[tuple[int, tuple]]:
    """(NT, variant key) of every kernel the dispatch may compile."""
    out = {(nt, cuda_mma._variant_key(nt)) for nt in range(1, cuda_mma.MAX_ROWS // 8 + 1)}
    for (bucket, _n, _k), (variant, _warps) in cuda_mma.TUNED.items():
        for nt in cuda_mma.bucket_nts(bucket):
            out.add((nt, cuda_mma._variant_key(nt, variant)))
    return sorted(out)


def _report(log: str) -> tuple[int, int, int]:
    """(registers, spill store bytes, spill load bytes) of ptxas's -v report for the one kernel."""
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    assert regs and spills, f"no ptxas report in NVRTC's log:\n{log}"
    return int(regs.group(1)), int(spills.group(1)), int(spills.group(2))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_every_launchable_variant_compiles_without_spills(arch, dtype):
    for nt, key in _launchable():
        variant = dict(key)
        src = cuda_mma.source(dtype, nt, variant)
        cubin, log = nvrtc.compile_with_log(src, arch, ("--ptxas-options=-v",))
        regs, stores, loads = _report(log)
        assert cubin, (arch, dtype, nt, variant)
        assert stores == 0 and loads == 0, (
            f"cuda_mma NT={nt} {variant} {dtype} for {arch}: {regs} registers, "
            f"{stores} bytes spill stores, {loads} bytes spill loads"
        )
        # the register cap of __launch_bounds__(256, MINB) holds
        assert regs <= 65536 // (256 * variant["MINB"]), (arch, nt, variant, regs)


def test_spill_report_is_read():
    """The check above can fail: a variant known to spill (activations of 64 rows loaded ahead, two
    blocks per SM) reports spill stores."""
    src = cuda_mma.source(torch.bfloat16, 8, {"XPRE": 1, "MINB": 2, "DEPTH": 3, "RT": 1, "LOADONLY": 0})
    _, log = nvrtc.compile_with_log(src, "sm_90", ("--ptxas-options=-v",))
    assert _report(log)[1] > 0


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_moe_decode_kernels_compile_without_spills(arch, dtype):
    """kernels/cuda_moe.py's gate_up, down and down_sum kernels and the sorted gate_up / down (each
    compiled with its own variant; the gate_up ones exist only where RT = 2, the two tiles their
    epilogues read)."""
    from nvfp4_fix.kernels import cuda_moe

    for variant, launched in (
        (cuda_moe.GATE_UP_VARIANT, ("nvfp4_moe_gate_up", "nvfp4_moe_gate_up_sorted")),
        (cuda_moe.DOWN_VARIANT, ("nvfp4_moe_down", "nvfp4_moe_down_sorted")),
        (cuda_moe.DOWN_SUM_VARIANT, ("nvfp4_moe_down_sum",)),
    ):
        _, log = nvrtc.compile_with_log(cuda_moe.source(dtype, variant), arch, ("--ptxas-options=-v",))
        kernels = re.findall(r"Function properties for (\w+)", log)
        assert set(launched) <= set(kernels), log
        assert (
            ("nvfp4_moe_gate_up" in kernels)
            == ("nvfp4_moe_gate_up_sorted" in kernels)
            == (variant["RT"] == 2)
        )
        assert ("nvfp4_moe_down_sum" in kernels) == ("PAIR_SUM" in variant), log
        spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
        assert len(spills) == len(kernels) and all(a == b == "0" for a, b in spills), (variant, log)


@pytest.mark.parametrize("wn", [2, 4])
def test_warps_side_by_side_over_n_compile(wn):
    """The WN > 1 variants (swept, not yet in the measured table) compile for sm_90 without spills at
    2, 4 and 8 column tiles, with both reductions (per-warp tiles; shared memory from NT * RT > 8)."""
    for nt, rt in ((2, 2), (4, 2), (8, 1), (4, 4)):
        variant = {"RT": rt, "DEPTH": 1, "XPRE": 0, "MINB": 1, "LOADONLY": 0, "WN": wn}
        src = cuda_mma.source(torch.bfloat16, nt, variant)
        _, log = nvrtc.compile_with_log(src, "sm_90", ("--ptxas-options=-v",))
        regs, stores, loads = _report(log)
        assert stores == 0 and loads == 0, (nt, variant, regs, stores, loads)
