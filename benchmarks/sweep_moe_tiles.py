# ruff: noqa: E501
"""Tile sweep of the fused MoE decode kernels (kernels/moe_decode.py, Triton; ``--cuda``: the tensor-core
kernels of kernels/cuda_moe.py) on Qwen3-30B-A3B expert shapes (128 experts, hidden 2048, expert
intermediate 768, top-8), and their launch counts.

    PYTHONPATH=src python benchmarks/sweep_moe_tiles.py [--t 1,8] [--bn 16,32,64] [--bk 64,128,256]
        [--warps 4,8] [--layers 8] [--quick] [--cuda]

``--cuda`` sweeps cuda_moe's compile variants (DEPTH, XPRE, MINB, RT) and warps per kernel instead:
gate_up, down (with the separate pair sum) and down_sum (``DOWN_SUM_MAX_TOKENS``), each with the others at their
defaults; variants that spill registers for this card are skipped (ptxas report through NVRTC), and every
variant's output is checked against the Triton kernels' on the same layer (rel L2 < 2e-2) before timing.

Timing: per configuration, one experts call per layer (each layer its own random weights, routing and
activations) captured in one CUDA graph, replayed 20 times (CUDA events) after 30 ms of warm-up replays;
microseconds per experts call = replay time / layers. ``--layers`` layers touch ~21 MB of expert weights
each at T=1, so with 8 the 50 MB L2 holds at most a fifth of what the next call reads (cold-ish, as in a
decode step). The gate_up tiles are swept with the down tiles at their defaults, then the down tiles with
gate_up at its defaults; every row is the whole 2-launch call. GB/s = NVFP4 bytes of the experts routed
(codes + e4m3 scales, each distinct expert once) / time. The first rows are the defaults and the
general (unfused) path of expert_stack.grouped_forward (gate_up, SiLU, mul, down, sum: 6 launches).
Launch counts come from torch.profiler (CUDA kernels of one eager call).
"""

from __future__ import annotations

import argparse
import itertools
import re
import sys

import torch
import triton
from bench_generation import graph_time

from nvfp4_fix import expert_stack, settings
from nvfp4_fix.kernels import cuda_moe, nvrtc
from nvfp4_fix.kernels import moe_decode as md

E, H, INTER, TOPK = 128, 2048, 768, 8


def packed(
    e: int, n: int, k: int, parts: int, device: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    codes = torch.randint(0, 256, (e, n, k // 2), dtype=torch.uint8, device=device)
    scales = torch.randint(0x30, 0x70, (e, n, k // 16), dtype=torch.uint8, device=device)  # realistic e4m3
    mul = torch.rand(e, parts, device=device) * 1e-3 + 1e-4
    return codes, scales.view(torch.float8_e4m3fn), mul


def make_layers(n: int, t: int, seed: int, device: str = "cuda") -> list[tuple]:
    torch.manual_seed(seed)
    layers = []
    for _ in range(n):
        st = expert_stack.Stacked(*packed(E, 2 * INTER, H, 2, device), *packed(E, H, INTER, 1, device), None)
        idx = torch.stack([torch.randperm(E, device=device)[:TOPK] for _ in range(t)])
        w = torch.rand(t, TOPK, device=device).softmax(-1).to(torch.bfloat16)
        x = torch.randn(t, H, device=device, dtype=torch.bfloat16)
        layers.append((st, x, idx, w))
    return layers


def routed_bytes(layers: list[tuple]) -> float:
    per_expert = 2 * INTER * (H // 2 + H // 16) + H * (INTER // 2 + INTER // 16)
    return sum(per_expert * int(idx.unique().numel()) for _, _, idx, _ in layers) / len(layers)


def time_call(layers: list[tuple], act) -> float:
    """Microseconds per experts call, graph-replayed over the layers (bench_generation.graph_time)."""

    def step():
        for st, x, idx, w in layers:
            expert_stack.grouped_forward(st, x, idx, w, act, False)

    return 1000 * graph_time(step) / len(layers)


def count_kernels(layer: tuple, act) -> list[str]:
    from torch.profiler import ProfilerActivity, profile

    st, x, idx, w = layer
    expert_stack.grouped_forward(st, x, idx, w, act, False)  # compiled before profiling
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        expert_stack.grouped_forward(st, x, idx, w, act, False)
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--t", default="1,8", help="tokens per call (T x 8 pairs; the fused path takes <= 64)")
    ap.add_argument("--bn", default="16,32,64")
    ap.add_argument("--bk", default="64,128,256")
    ap.add_argument("--warps", default="4,8")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--quick", action="store_true", help="BN 32,64 x BK 128 x warps 4 only")
    ap.add_argument("--cuda", action="store_true", help="sweep kernels/cuda_moe.py's variants and warps")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA device")
        return 2
    ts = [int(v) for v in args.t.split(",")]
    if args.quick:
        args.bn, args.bk, args.warps = "32,64", "128", "4"
    silu = torch.nn.SiLU()
    unfused = lambda g: torch.nn.functional.silu(g)  # noqa: E731  (not recognised as SiLU: general path)
    layers = {t: make_layers(args.layers, t, seed=t) for t in ts}
    print(f"{torch.cuda.get_device_name()}; torch {torch.__version__}, triton {triton.__version__}")
    print(f"Qwen3-30B-A3B experts: E={E} H={H} I={INTER} top-{TOPK}; {args.layers} layers cycled per graph\n")

    if args.cuda:
        return sweep_cuda(layers, ts, silu)
    with settings.override(cuda_moe=False):
        return sweep_triton(args, layers, ts, silu, unfused)


def sweep_triton(args, layers: dict, ts: list[int], silu, unfused) -> int:
    grid = list(itertools.product(*([int(v) for v in s.split(",")] for s in (args.bn, args.bk, args.warps))))
    for t in ts:
        for label, act in (("fused", silu), ("unfused", unfused)):
            names = count_kernels(layers[t][0], act)
            print(f"launches, T={t}, {label}: {len(names)}: {', '.join(n[:40] for n in names)}")
    print()

    default_gu, default_down = md.GATE_UP_TILES, md.DOWN_TILES
    head = (
        "| swept | gate_up BN/BK/warps | down BN/BK/warps | "
        + " | ".join(f"us T={t} | GB/s T={t}" for t in ts)
        + " |"
    )
    print(head)
    print("|" + "---|" * (3 + 2 * len(ts)))
    rows: list[tuple[str, md.Tiles | None, md.Tiles | None]] = [
        ("defaults", default_gu, default_down), ("unfused path", None, None)
    ]  # fmt: skip
    rows += [("gate_up", md.Tiles(bn, bk, wp), default_down) for bn, bk, wp in grid]
    rows += [("down", default_gu, md.Tiles(bn, bk, wp)) for bn, bk, wp in grid]
    for label, gu, down in rows:
        cells = []
        for t in ts:
            md.GATE_UP_TILES, md.DOWN_TILES = gu or default_gu, down or default_down
            try:
                us = time_call(layers[t], unfused if gu is None else silu)
                cells.append(f"{us:.1f} | {routed_bytes(layers[t]) / us / 1e3:.0f}")
            except Exception as e:  # noqa: BLE001 - e.g. out of registers / shared memory: keep sweeping
                cells.append(f"failed: {type(e).__name__} | ")
            finally:
                md.GATE_UP_TILES, md.DOWN_TILES = default_gu, default_down
        tiles = " | ".join(f"{x.bn}/{x.bk}/{x.warps}" if x else "-" for x in (gu, down))
        print(f"| {label} | {tiles} | " + " | ".join(cells) + " |", flush=True)
    print(f"\ndefaults: GATE_UP_TILES={default_gu}, DOWN_TILES={default_down} (kernels/moe_decode.py)")
    return 0


#: (DEPTH, XPRE, MINB) of gate_up (RT = 2: gate and up tiles), (RT, DEPTH, XPRE, MINB) of down,
#: (DEPTH, XPRE) of down_sum (MINB = 1); each with these warps per block
CUDA_GATE_UP = [(1, 0, 1), (2, 0, 1), (3, 0, 1), (2, 1, 1), (1, 0, 2), (2, 0, 2)], (2, 4, 8)
CUDA_DOWN = [(1, 1, 0, 2), (1, 2, 1, 2), (1, 2, 0, 2), (1, 3, 0, 2), (2, 1, 0, 1), (2, 2, 0, 1)], (1, 2, 4)
CUDA_DOWN_SUM = [(1, 0), (2, 0), (2, 1), (3, 0)], (4, 8)
_KERNEL_OF = {"GATE_UP_VARIANT": "nvfp4_moe_gate_up", "DOWN_VARIANT": "nvfp4_moe_down",
              "DOWN_SUM_VARIANT": "nvfp4_moe_down_sum"}  # fmt: skip
_CUDA_KNOBS = ("GATE_UP_VARIANT", "GATE_UP_WARPS", "DOWN_VARIANT", "DOWN_WARPS", "DOWN_SUM_MAX_TOKENS",
               "DOWN_SUM_VARIANT", "DOWN_SUM_WARPS")  # fmt: skip


def _spills(variant: dict[str, int], kernel: str) -> bool:
    """Whether ``kernel`` of cuda_moe's module compiled with ``variant`` spills registers on this card."""
    major, minor = torch.cuda.get_device_capability()
    _, log = nvrtc.compile_with_log(
        cuda_moe.source(torch.bfloat16, variant), f"sm_{major}{minor}", ("--ptxas-options=-v",)
    )
    report = next(
        (p for p in log.split("Function properties for ")[1:] if p.split(None, 1)[0] == kernel), None
    )
    if report is None:  # the device's NVRTC gave no ptxas report (a cached build): time it anyway
        print(f"  no ptxas report for {kernel} {variant}: spills not checked", flush=True)
        return False
    return any(
        a != "0" or b != "0"
        for a, b in re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    )


def sweep_cuda(layers: dict, ts: list[int], silu) -> int:
    defaults = {k: getattr(cuda_moe, k) for k in _CUDA_KNOBS}
    with settings.override(cuda_moe=False):
        want = {t: expert_stack.grouped_forward(*layers[t][0], silu, False).float() for t in ts}
    rows: list[tuple[str, dict]] = [
        ("defaults", {}),
        ("defaults, down_sum at every T", {"DOWN_SUM_MAX_TOKENS": max(ts)}),
        ("defaults, down + sum_pairs at every T", {"DOWN_SUM_MAX_TOKENS": 0}),
    ]
    for (depth, xpre, minb), warps in itertools.product(*CUDA_GATE_UP):
        v = {**defaults["GATE_UP_VARIANT"], "DEPTH": depth, "XPRE": xpre, "MINB": minb}
        rows.append(
            (f"gate_up D={depth} X={xpre} B={minb} w={warps}", {"GATE_UP_VARIANT": v, "GATE_UP_WARPS": warps})
        )
    for (rt, depth, xpre, minb), warps in itertools.product(*CUDA_DOWN):
        v = {**defaults["DOWN_VARIANT"], "RT": rt, "DEPTH": depth, "XPRE": xpre, "MINB": minb}
        rows.append(
            (
                f"down RT={rt} D={depth} X={xpre} B={minb} w={warps}",
                {"DOWN_VARIANT": v, "DOWN_WARPS": warps, "DOWN_SUM_MAX_TOKENS": 0},
            )
        )
    for (depth, xpre), warps in itertools.product(*CUDA_DOWN_SUM):
        v = {**defaults["DOWN_SUM_VARIANT"], "DEPTH": depth, "XPRE": xpre}
        rows.append((f"down_sum D={depth} X={xpre} w={warps}",
                     {"DOWN_SUM_MAX_TOKENS": max(ts), "DOWN_SUM_VARIANT": v, "DOWN_SUM_WARPS": warps}))  # fmt: skip
    print("| cuda_moe swept | " + " | ".join(f"us T={t} | GB/s T={t}" for t in ts) + " |")
    print("|" + "---|" * (1 + 2 * len(ts)))
    for label, knobs in rows:
        swept = next((k for k in knobs if k in _KERNEL_OF), None)
        if swept is not None and _spills(knobs[swept], _KERNEL_OF[swept]):
            print(f"| {label} | spills: skipped |", flush=True)
            continue
        cells = []
        for t in ts:
            for k, v in knobs.items():
                setattr(cuda_moe, k, v)
            try:
                with settings.override(cuda_moe=True):
                    got = expert_stack.grouped_forward(*layers[t][0], silu, False).float()
                    err = float((got - want[t]).norm() / want[t].norm())
                    if not err < 2e-2:
                        cells.append(f"WRONG (rel {err:.2e}) | ")
                        continue
                    us = time_call(layers[t], silu)
                cells.append(f"{us:.1f} | {routed_bytes(layers[t]) / us / 1e3:.0f}")
            except Exception as e:  # noqa: BLE001 - keep sweeping
                cells.append(f"failed: {type(e).__name__} | ")
            finally:
                for k, v in defaults.items():
                    setattr(cuda_moe, k, v)
        print(f"| {label} | " + " | ".join(cells) + " |", flush=True)
    print(f"\ndefaults: {defaults} (kernels/cuda_moe.py)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
