"""Every Triton kernel launch of the CPU tests compiles for sm_90 outside the interpreter.

Triton's interpreter runs code real compilation rejects (a plain float module global read in a
``@triton.jit`` function: ``NameError: Cannot access global variable``). Here the public entry points
of each Triton module are called as the CPU tests call them, on small CPU inputs whose shapes take each
constexpr branch, with every launch recorded instead of run (tests/triton_launches.py: the arguments
bound to the kernel's signature and typed as the JIT types them); a process without the interpreter
then compiles each distinct launch with ``triton.compile`` for ``GPUTarget("cuda", 90, 32)`` (TTIR
to cubin; Triton's bundled ptxas). Each entry point is called twice: as under the interpreter, and with
the modules' ``_INTERPRET`` off and ``supports`` forced true, so the branches only a GPU takes (packed-PTX
dequantization ``ASM`` / ``DEQ=2``, 16-bit ``tl.dot``) are compiled too. At most the first
``PER_KERNEL`` distinct launches of a kernel are compiled (77 launches: about 50 s on 2 cores with an
empty Triton cache, 5 s with a warm one). Skipped without triton, or where it cannot compile for the
target (no CUDA backend or ptxas).

Covered: triton_nvfp4 through triton_ops (gemv, mm, dequantize_rows, split-K reduce), triton_fp8,
fp8_act_quant, act_quant, kv_cache, decode_attention, moe_grouped, moe_route, moe_decode, moe_router: every
``*_kernel`` of nvfp4_fix.kernels (checked: a kernel none of the calls below launches fails the
test), with the ``@triton.jit`` helpers they call. Not covered: branches chosen by ``x.is_cuda`` (act_quant's
``RECIP=True``; decode_attention's CUDA block sizes 32/128 and split counts), the gemv's ``DEQ=1`` (no
config picks it); cuda_mma (NVRTC CUDA C++) and humming (an external library) are not Triton.
"""

from __future__ import annotations

import importlib
import os
import pkgutil

import pytest
import torch

triton = pytest.importorskip("triton")

PER_KERNEL = 8


def _nvfp4(n: int, k: int, rows_mul: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    wp = torch.zeros(n, k // 2, dtype=torch.uint8)
    ws = torch.zeros(n, k // 16, dtype=torch.uint8).view(torch.float8_e4m3fn)
    return wp, ws, torch.ones(n if rows_mul else 1)


def _nvfp4_launches() -> None:
    from nvfp4_fix.kernels import triton_ops as T

    # (M, N, K, dtype, bias, per-row multipliers): K 272 is not a whole tile, K 16384 splits K
    for m, n, k, dtype, bias, rows in [
        (1, 32, 256, torch.bfloat16, False, False), (1, 48, 272, torch.float16, True, True),
        (1, 32, 16384, torch.bfloat16, True, False), (20, 32, 4096, torch.float16, False, True),
        (100, 64, 272, torch.bfloat16, True, False),
    ]:  # fmt: skip
        wp, ws, mul = _nvfp4(n, k, rows)
        x, b = torch.zeros(m, k, dtype=dtype), torch.zeros(n, dtype=dtype) if bias else None
        if m == 1:
            T.gemv(x, wp, ws, mul, b)
        if (m, k) != (1, 256):
            T.mm(x, wp, ws, mul, b)
        if m > 1:
            T.dequant_mm(x, wp, ws, mul, b)
    for dtype in (torch.float32, torch.float16):
        T.dequantize_rows(*_nvfp4(40, 256, dtype == torch.float16), dtype, 5, 30)


def _fp8_launches() -> None:
    from nvfp4_fix.kernels import triton_fp8
    from nvfp4_fix.schemes import FP8Spec

    n, k = 96, 256
    w = torch.zeros(n, k, dtype=torch.float8_e4m3fn)
    # (spec, scale shape, M, dtype): block width 40 has no power-of-two K tile (the gathering dequantizer)
    for spec, shape, m, dtype in [
        (FP8Spec("tensor"), (1,), 1, torch.bfloat16), (FP8Spec("channel"), (n, 1), 20, torch.float16),
        (FP8Spec("block", block=(32, 64)), (3, 4), 40, torch.bfloat16),
        (FP8Spec("block", block=(32, 40)), (3, 7), 64, torch.float16),
    ]:  # fmt: skip
        x, scale = torch.zeros(m, k, dtype=dtype), torch.ones(shape)
        if triton_fp8.block_k(spec, k) is not None:
            triton_fp8.fp8_linear(x, w, scale, spec, torch.zeros(n))
        triton_fp8.dequant_mm(x, w, scale, spec, None)
        triton_fp8.dequantize_rows(w, scale, spec, torch.float32, 7, 50)


def _activation_launches() -> None:
    from nvfp4_fix.kernels import act_quant, fp8_act_quant

    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        x = torch.zeros(3, 96, dtype=dtype)
        act_quant.fake_quantize(x, torch.ones(1))
        fp8_act_quant.quantize_rows(x)
        fp8_act_quant.quantize_rows(x, torch.ones(1, dtype=dtype))


def _attention_launches() -> None:
    from nvfp4_fix.kernels import decode_attention, kv_cache

    # (B, H, H_kv, L, D, dtype, mask)
    for b, h, hkv, length, d, dtype, mask in [
        (2, 8, 2, 100, 64, torch.bfloat16, None), (1, 4, 4, 70, 32, torch.float32, torch.bool),
        (2, 6, 2, 130, 128, torch.float16, torch.float32),
    ]:  # fmt: skip
        q = torch.zeros(b, h, 1, d, dtype=dtype)
        keys, values = (torch.zeros(b, hkv, length, d, dtype=dtype) for _ in range(2))
        m = None if mask is None else torch.zeros(b, 1, 1, length, dtype=mask)
        decode_attention.decode_attention(q, keys, values, m, 0.125)
        new = torch.zeros(b, hkv, 1, d, dtype=dtype)
        kv_cache.append_kv(keys, values, new, new.clone(), torch.zeros(1, dtype=torch.long))


def _moe_launches() -> None:
    from nvfp4_fix import settings
    from nvfp4_fix.kernels import moe_decode, moe_grouped, moe_route, moe_router

    # router logits (experts, k, renormalize, dtype): 60 experts pad to 64, k = 6 to 8; 512 takes 4 warps
    for experts, k, normalize, dtype in [
        (128, 8, True, torch.bfloat16), (60, 6, False, torch.float32), (512, 10, True, torch.float16),
    ]:  # fmt: skip
        moe_router.softmax_topk(torch.zeros(3, experts, dtype=dtype), k, normalize)
        # the fused logits + top-k (router_topk's one launch): one expert a program at 128 / 60, 4 at 512
        hidden = torch.zeros(2, 96, dtype=dtype)
        moe_router._gemv_topk(hidden, torch.zeros(experts, 96, dtype=dtype), k, normalize)

    e, h, i, topk = 4, 128, 64, 2

    def experts(n: int, k: int, parts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        codes, scales = (torch.zeros(e, n, k // d, dtype=torch.uint8) for d in (2, 16))
        return codes, scales, torch.ones(e, parts)

    # (tokens, dtype, block_m, silu_glu, routing weights)
    for t, dtype, block_m, glu, weighted in [
        (3, torch.bfloat16, 1, False, False), (3, torch.float16, 1, False, True),
        (20, torch.bfloat16, 16, True, False), (40, torch.float32, 64, False, True),
        (20, torch.float16, 16, False, False),
    ]:  # fmt: skip
        idx = torch.arange(t * topk).reshape(t, topk) % e
        codes, scales, mul = experts(2 * i, h, 2) if glu else experts(i, h, 1)
        with settings.override(moe_route_kernel=True):  # its one-program kernel too (the default)
            plan = moe_route.route(idx, e, block_m)
        w = torch.ones(t * topk) if weighted else None
        moe_grouped.expert_mm(torch.zeros(t, h, dtype=dtype), topk, plan, codes, scales, mul, i, None, w, glu)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        idx = torch.tensor([[0, 3], [1, 5]])
        moe_decode.decode_experts(
            torch.zeros(2, h, dtype=dtype), idx, torch.ones(2, 2), experts(2 * i, h, 2), experts(h, i, 1)
        )
        moe_decode.sum_pairs(torch.zeros(4, h), idx, e, dtype)
    idx = torch.arange(20).reshape(1, 20) % e  # top-k 20: three passes of the down kernel
    x = torch.zeros(1, h, dtype=torch.bfloat16)
    moe_decode.decode_experts(x, idx, torch.ones(1, 20), experts(2 * i, h, 2), experts(h, i, 1))


_LAUNCHERS = (_nvfp4_launches, _fp8_launches, _activation_launches, _attention_launches, _moe_launches)


def _kernel_modules() -> list:
    import nvfp4_fix.kernels as pkg

    return [importlib.import_module(f"{pkg.__name__}.{m.name}") for m in pkgutil.iter_modules(pkg.__path__)]


def _record(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    from triton_launches import recorded

    with recorded() as launches:
        for launch in _LAUNCHERS:
            launch()
        with monkeypatch.context() as mp:  # the branches a GPU takes
            for module in _kernel_modules():
                if hasattr(module, "_INTERPRET"):
                    mp.setattr(module, "_INTERPRET", False)
                    if hasattr(module, "supports"):
                        mp.setattr(module, "supports", lambda *a, **k: True)
            for launch in _LAUNCHERS:
                launch()
    return launches


def test_every_recorded_launch_compiles_for_sm90(monkeypatch: pytest.MonkeyPatch) -> None:
    from triton.runtime.interpreter import InterpretedFunction
    from triton_launches import compile_for_gpu

    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        pytest.skip("no interpreter: the GPU tests compile every kernel for real")
    launches = _record(monkeypatch)
    kernels = {
        f"{m.__name__}.{name}"
        for m in _kernel_modules()
        for name, f in vars(m).items()
        if isinstance(f, InterpretedFunction) and name.endswith("_kernel") and f.fn.__module__ == m.__name__
    }
    recorded = {f"{launch['module']}.{launch['kernel']}" for launch in launches}
    assert kernels - recorded == set(), "kernels no entry point above launched"
    capped, count = [], dict.fromkeys(recorded, 0)
    for launch in launches:
        name = f"{launch['module']}.{launch['kernel']}"
        count[name] += 1
        if count[name] <= PER_KERNEL:
            capped.append(launch)
    result = compile_for_gpu(capped)
    if "skip" in result:
        pytest.skip(result["skip"])
    failed = [
        f"{f['kernel']} ({f['module']}) signature {f['signature']} constexprs {f['constexprs']} options "
        f"{f['options']}:\n{f['error']}"
        for f in result["failures"]
    ]
    if failed:
        pytest.fail(
            f"{len(failed)} of {result['compiled']} launches do not compile:\n\n" + "\n\n".join(failed),
            pytrace=False,
        )
