# ruff: noqa: B023, E501  (lambdas are called at once, inside the loop that binds them)
"""FP8 layers of mixed checkpoints on one card: FP8Linear's paths against cuBLAS bf16 with the dense
weight resident, each checked against a float64 reference before it is timed.

    PYTHONPATH=src python benchmarks/bench_fp8.py [--m 1,16,64,128,2048] [--reps 15] [--budget-s 75]
        [--eager] [--out T.md] [--json J]
    PYTHONPATH=src python benchmarks/bench_fp8.py --device cpu --tiny     # the script's smoke test

Reference: e4m3 decoded from its bits, scales spread per tensor / row / 128x128 block, float64 products
on the device; the activation quantization applied with nvfp4_fix.fp8.fake_quantize_fp8 (which
tests/test_fp8.py holds bit-equal to compressed-tensors' own forward). Tolerance: relative L2 1e-2 (bf16).

Timing (GPU), as benchmarks/bench_humming.py: every method captured in a CUDA graph as back-to-back
calls (bench_kernels.py's ``bench_graphs_interleaved``: each graph warmed 30 ms, then the methods'
replays alternate), median of ``--reps`` replays, us per call. The calls cycle through copies of the
layer (and of the bf16 weight) that together exceed 4.5x the L2, so every call reads its weights from
HBM. Columns:

* ``bf16``: x @ W.T, W dense bf16 resident (cuBLAS).
* ``w8a16``: FP8Linear with activation_mode="bf16", the layer's own dispatch (``kernel`` says which
  path: ``dot`` = Triton tl.dot on the e4m3 codes, ``dequant`` = Triton dequantization into a scratch +
  cuBLAS); ``other``: the W8A16 path the dispatch did not take, called directly (to place MAX_M).
* ``w8a8``: FP8Linear's default (activation_mode="quantize"): torch._scaled_mm on FP8 tensor cores
  where its scaling reproduces the checkpoint's activation quantization (``path``), else the emulation
  (fake-quantize + W8A16). ``_scaled_mm``: torch._scaled_mm alone on activation codes quantized
  beforehand ("-" where the checkpoint's scaling has no _scaled_mm form).
* ``--eager``: also w8a16 and w8a8 called eagerly (CUDA events around one call, weights warm in L2):
  what a model run without CUDA graphs pays, host launch overhead included.

``--budget-s``: (shape, FP8 kind) pairs that would start past it are skipped (listed).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

from nvfp4_fix import fp8_cuda
from nvfp4_fix.fp8 import FP8Linear
from nvfp4_fix.schemes import FP8Spec
from nvfp4_fix.tools import fp8_reference

SHAPES = [
    ("8B qkv (fused)", 6144, 4096),
    ("8B o", 4096, 4096),
    ("8B gate_up (fused)", 28672, 4096),
    ("8B down", 4096, 14336),
    ("27B-like attn q", 5120, 5120),
]
TINY = [("tiny", 256, 512)]
SPECS = [
    FP8Spec("tensor", "static"),
    FP8Spec("channel", "dynamic-token"),
    FP8Spec("block", "dynamic-group", (128, 128), 128),
]
METHODS = ["bf16", "w8a16", "other", "w8a8", "_scaled_mm"]
TOL = 1e-2


def make_layer(n: int, k: int, spec: FP8Spec, device: str) -> FP8Linear:
    """N(0, 0.05) weights quantized with the spec's scales (amax / 448), built on ``device``."""
    g = torch.Generator(device).manual_seed(n * 31 + k)
    w = torch.randn(n, k, generator=g, device=device) * 0.05
    if spec.weights == "tensor":
        scale = (w.abs().max() / 448).reshape(1)
        full = scale.reshape(1, 1)
    elif spec.weights == "channel":
        scale = w.abs().amax(1, keepdim=True) / 448
        full = scale
    else:
        bn, bk = spec.block or (128, 128)
        rows, cols = math.ceil(n / bn), math.ceil(k / bk)
        pad = torch.zeros(rows * bn, cols * bk, device=device)
        pad[:n, :k] = w
        scale = pad.reshape(rows, bn, cols, bk).abs().amax((1, 3)) / 448
        full = scale.repeat_interleave(bn, 0).repeat_interleave(bk, 1)[:n, :k]
    layer = FP8Linear(k, n, spec, scale_shape=tuple(scale.shape),
                      input_scale_shape=(1,) if spec.activations == "static" else None, device=device)  # fmt: skip
    layer.weight.data.copy_((w / full).clamp(-448, 448).to(torch.float8_e4m3fn))
    layer.weight_scale.data.copy_(scale)
    if layer.input_scale is not None:
        layer.input_scale.data.fill_(4.0 / 448)
    return layer


def reference_weight(layer: FP8Linear) -> torch.Tensor:
    """float64 W on the layer's device, from verify's reference (independent of nvfp4_fix.fp8)."""
    return fp8_reference.reference_weight(layer.weight.detach(), layer.weight_scale.detach(), layer.spec)


def layer_call(layer: FP8Linear, mode: str):  # noqa: ANN201
    def call(x: torch.Tensor) -> torch.Tensor:
        layer.activation_mode = mode
        return layer(x)

    return call


class Case:
    """One (shape, FP8 kind): layer copies, bf16 copies, and per M the methods' calls on copy i."""

    def __init__(self, n: int, k: int, spec: FP8Spec, device: str) -> None:
        self.n, self.k, self.spec, self.cuda = n, k, spec, device.startswith("cuda")
        l2 = torch.cuda.get_device_properties(device).L2_cache_size if self.cuda else 0
        self.layers = [make_layer(n, k, spec, device)]
        self.layers += [
            copy.deepcopy(self.layers[0]) for _ in range(max(1, math.ceil(4.5 * l2 / (n * k))) - 1)
        ]
        dense = self.layers[0].dequantized_weight(torch.bfloat16)
        self.dense = [dense] + [dense.clone() for _ in range(max(1, math.ceil(4.5 * l2 / (2 * n * k))) - 1)]
        self.w64 = reference_weight(self.layers[0])
        self.n_inner = max(10, len(self.layers), len(self.dense))

    def kernels(self, x: torch.Tensor) -> tuple[str, str | None]:
        """(the W8A16 path the layer's dispatch takes, the other one where it can run) on this card."""
        chosen = fp8_cuda.w8a16_path(x, self.spec, self.k) if self.cuda else None
        if chosen is None:
            return "torch", None
        tri = fp8_cuda._triton
        dot_ok = tri.block_k(self.spec, self.k) is not None and torch.cuda.get_device_capability(
            x.device
        ) >= (8, 9)
        return chosen, ("dequant" if chosen == "dot" else ("dot" if dot_ok else None))

    def methods(self, xs: list[torch.Tensor]) -> dict[str, tuple[object, bool] | None]:
        """label -> (call(i), whether its reference quantizes x) or None where the method cannot run."""
        x0, spec, n = xs[0], self.spec, self.n
        ls, ds = self.layers, self.dense
        _, other = self.kernels(x0)
        out: dict[str, tuple[object, bool] | None] = {
            "bf16": (lambda i: xs[i % len(xs)] @ ds[i % len(ds)].T, False),
            "w8a16": (lambda i: layer_call(ls[i % len(ls)], "bf16")(xs[i % len(xs)]), False),
            "other": None,
            "w8a8": (lambda i: layer_call(ls[i % len(ls)], "quantize")(xs[i % len(xs)]), True),
            "_scaled_mm": None,
        }
        if other is not None:
            out["other"] = (lambda i: fp8_cuda.w8a16_linear(xs[i % len(xs)], ls[i % len(ls)].weight,
                                                             ls[i % len(ls)].weight_scale, spec, None, other), False)  # fmt: skip
        scaling = fp8_cuda.scaled_mm_scaling(spec, x0, n) if self.cuda else None
        if scaling is not None:
            ops = [
                fp8_cuda.scaled_mm_operands(x, ls[0].weight_scale, ls[0].input_scale, spec, scaling, n)
                for x in xs
            ]
            out["_scaled_mm"] = (lambda i: torch._scaled_mm(ops[i % len(ops)][0], ls[i % len(ls)].weight.t(), scale_a=ops[i % len(ops)][1],
                                                            scale_b=ops[i % len(ops)][2], out_dtype=x0.dtype), True)  # fmt: skip
        return out


def eager_us(fn, reps: int, cuda: bool) -> float:  # noqa: ANN001
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) * 1000)
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times)


def run_case(case: Case, name: str, ms: list[int], reps: int, eager: bool, failures: list[str]) -> list[dict]:
    dev = case.layers[0].weight.device
    rows = []
    for m in ms:
        xs = [
            (torch.randn(m, case.k, generator=torch.Generator().manual_seed(m + j)) * 2).bfloat16().to(dev)
            for j in range(2)
        ]
        calls = case.methods(xs)
        kernel, other = case.kernels(xs[0])
        w8a8_path = "_scaled_mm" if calls["_scaled_mm"] is not None else "emulation"
        row = {
            "shape": name,
            "n": case.n,
            "k": case.k,
            "m": m,
            "spec": case.spec.describe(),
            "kernel": kernel,
            "other_kernel": other,
            "path": w8a8_path,
        }
        with torch.no_grad():
            refs = {
                False: xs[0].double() @ case.w64.T,
                True: case.layers[0].prepare_input(xs[0]).double() @ case.w64.T,
            }
            live = {label: c for label, c in calls.items() if c is not None}
            for label, (fn, quant) in live.items():
                err = float((fn(0).double() - refs[quant]).norm() / refs[quant].norm())
                row[label + "_err"] = err
                if not err < TOL:
                    failures.append(f"{name} {case.spec.describe()} M={m} {label}: rel err {err:.3g}")
            if case.cuda:
                from bench_kernels import bench_graphs_interleaved

                ts = bench_graphs_interleaved([fn for fn, _ in live.values()], case.n_inner, reps)
            else:
                ts = [eager_us(lambda: fn(0), reps, False) for fn, _ in live.values()]
            row.update({label: None for label in METHODS})
            row.update(dict(zip(live, ts, strict=True)))
            if eager:
                row["w8a16 eager"] = eager_us(lambda: live["w8a16"][0](0), reps, case.cuda)
                row["w8a8 eager"] = eager_us(lambda: live["w8a8"][0](0), reps, case.cuda)
        rows.append(row)
        print(
            f"  {name} {case.spec.describe()} M={m}: "
            + ", ".join(f"{lb} {row[lb]:.1f}" for lb in live)
            + f" us  [w8a16: {kernel}]",
            flush=True,
        )
    return rows


DEQUANT_CFGS = [(16, 512, 4), (8, 1024, 4), (32, 256, 4), (32, 512, 8), (64, 256, 8), (16, 1024, 8)]


def sweep_dequant(reps: int) -> list[str]:
    """triton_fp8.dequantize_rows alone on the 8B gate_up into a bf16 scratch, per (BN, BK, warps):
    us and GB/s counting N*K bytes read and 2*N*K written (weight and output each far above the L2)."""
    from bench_kernels import bench_graphs_interleaved

    name, n, k = SHAPES[2]
    lines = [f"\ndequantize_rows alone, {name} {n}x{k} -> bf16 (us, GB/s), per (BN, BK, num_warps):", ""]
    for spec in SPECS:
        layer = make_layer(n, k, spec, "cuda")
        out = torch.empty(n, k, dtype=torch.bfloat16, device="cuda")
        want = layer.dequantized_weight(torch.bfloat16)
        calls, cfgs = [], []
        for cfg in DEQUANT_CFGS:
            fp8_cuda._triton.dequantize_rows(
                layer.weight, layer.weight_scale, spec, torch.bfloat16, out=out, cfg=cfg
            )
            if not torch.equal(out, want):
                lines.append(f"  {spec.describe()} {cfg}: FAILED (differs from fp8.dequantize_fp8)")
                continue
            calls.append(
                lambda i, c=cfg: fp8_cuda._triton.dequantize_rows(
                    layer.weight, layer.weight_scale, spec, torch.bfloat16, out=out, cfg=c
                )
            )
            cfgs.append(cfg)
        ts = bench_graphs_interleaved(calls, 10, reps)
        cells = [f"{c}: {t:.1f} us {3 * n * k / (t * 1e3):.0f} GB/s" for c, t in zip(cfgs, ts, strict=True)]
        lines.append(f"  {spec.describe()}: " + "; ".join(cells))
    return lines


def table(
    rows: list[dict], head: str, eager: bool, cuda: bool, skipped: list[str], failures: list[str]
) -> list[str]:
    def us(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f}"

    def ratio(a: float | None, b: float | None) -> str:
        return "-" if a is None or b is None else f"{a / b:.2f}x"

    how = "CUDA graphs, cold L2, methods interleaved" if cuda else "eager, CPU"
    lines = [head, "", f"Median us per call ({how}); vs bf16 = bf16 time / method time; GB/s = (N*K + 2*M*K + 2*M*N) bytes / w8a16 time. "
             f"Every cell passed a float64 check (rel L2 < {TOL}) unless listed under FAILED.", "",
             "| shape | FP8 kind | M | bf16 us | w8a16 us (kernel) | w8a16 GB/s | other W8A16 path us | w8a8 us (path) | _scaled_mm alone us |"
             + (" w8a16 eager us | w8a8 eager us |" if eager else "") + " w8a16 vs bf16 | w8a8 vs bf16 |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if eager else "") + "---:|---:|"]  # fmt: skip
    for r in rows:
        gbs = (r["n"] * r["k"] + 2 * r["m"] * (r["k"] + r["n"])) / (r["w8a16"] * 1e3)
        cells = [r["shape"], r["spec"], str(r["m"]), us(r["bf16"]), f"{us(r['w8a16'])} ({r['kernel']})", f"{gbs:.0f}",
                 "-" if r["other"] is None else f"{us(r['other'])} ({r['other_kernel']})", f"{us(r['w8a8'])} ({r['path']})", us(r["_scaled_mm"])]  # fmt: skip
        if eager:
            cells += [us(r["w8a16 eager"]), us(r["w8a8 eager"])]
        cells += [ratio(r["bf16"], r["w8a16"]), ratio(r["bf16"], r["w8a8"])]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [f"SKIPPED (--budget-s): {s}" for s in skipped] + [f"FAILED: {f}" for f in failures]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--m", default="1,16,64,128,2048")
    p.add_argument("--reps", type=int, default=15)
    p.add_argument(
        "--budget-s", type=float, default=75.0, help="skip (shape, kind) pairs that would start later"
    )
    p.add_argument("--eager", action="store_true", help="also time w8a16 and w8a8 eagerly")
    p.add_argument(
        "--sweep-dequant", action="store_true", help="first time the dequantize kernel's configs alone"
    )
    p.add_argument("--json", default=None)
    p.add_argument("--out", default=None, help="write the markdown table here too")
    p.add_argument("--device", default="cuda")
    p.add_argument("--shapes", type=int, default=len(SHAPES), help="only the first N shapes")
    p.add_argument("--tiny", action="store_true", help="one 256 x 512 layer, M = 1 and 16, 3 reps")
    args = p.parse_args()
    t_start = time.time()
    dev = args.device
    if dev.startswith("cuda") and not torch.cuda.is_available():
        print("bench_fp8: no CUDA device (use --device cpu --tiny to try the script)", file=sys.stderr)
        return 2
    shapes, ms, reps = (
        (TINY, [1, 16], 3)
        if args.tiny
        else (SHAPES[: args.shapes], [int(v) for v in args.m.split(",")], args.reps)
    )
    cuda = dev.startswith("cuda")
    if cuda:
        prop = torch.cuda.get_device_properties(dev)
        card = f"{prop.name} (sm_{prop.major}{prop.minor}, {prop.multi_processor_count} SMs, L2 {prop.L2_cache_size / 2**20:.0f} MiB)"
    else:
        card = "CPU"
    head = f"# FP8Linear on {card}, torch {torch.__version__}"
    print(head, flush=True)
    rows, failures, skipped = [], [], []
    sweep = sweep_dequant(args.reps) if args.sweep_dequant and cuda else []
    print("\n".join(sweep), flush=True)
    for name, n, k in shapes:
        for spec in SPECS:
            if time.time() - t_start > args.budget_s:
                skipped.append(f"{name} {spec.describe()}")
                print(f"  {name} {spec.describe()}: skipped (--budget-s spent)", flush=True)
                continue
            case = Case(n, k, spec, dev)
            rows += run_case(case, name, ms, reps, args.eager, failures)
            del case
            if cuda:
                torch.cuda.empty_cache()
    lines = table(rows, head, args.eager, cuda, skipped, failures) + sweep
    lines.append(f"\nwall time {time.time() - t_start:.0f} s")
    print("\n".join(lines))
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"device": card, "rows": rows, "failures": failures, "skipped": skipped}, indent=1)
        )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
