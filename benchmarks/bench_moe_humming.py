"""Decode MoE experts (issue 19, item 1): this package's experts against Humming's MoE GEMMs and bf16.

Qwen3-30B-A3B expert layers (128 experts, hidden 2048, expert intermediate 768, top-8), random NVFP4
weights built as benchmarks/sweep_moe_tiles.py builds them, every expert with its own gate and up
global scales (they differ, as in real checkpoints), at T = 1, 2, 4, 8 tokens (and optionally 128):
  ours: expert_stack.grouped_forward (cuda_moe: pairs indexed up to 64, sorted by expert up to
    moe_decode.SORTED_MAX_PAIRS, moe_grouped's tl.dot kernels above); "ours, Triton": the same with
    settings.cuda_moe off (Triton decode kernels up to 64 pairs, moe_grouped above); "ours, route kernel":
    with settings.moe_route_kernel on (the pairs sorted by one Triton program, not ~35 torch ops);
  Humming (humming-kernels, indexed MoE GEMMs through HummingLayer(num_experts=128)): Humming takes one
    global scale per expert per weight tensor, so gate and up run as two MoE GEMMs (each with its own
    per-expert scales), then silu(gate) * up, then down (one row per (token, expert) pair), then the
    routing weights and the sum over each token's pairs (one bmm). The routing tables (vLLM's
    moe_align_block_size layout: sorted_ids, expert_ids, num_tokens_padded) are built with torch ops by
    ``align`` below: "Humming" times the GEMMs with the tables prebuilt outside the graph (vLLM's one
    align kernel would add a launch), "+ routing" builds them inside the timed call. No fused gate_up
    arm: one scale per expert cannot serve gate and up scales that differ;
  bf16: dequantized bf16 weights through torch's grouped_mm, as transformers' ``grouped_mm`` experts
    (sort the pairs by expert, two grouped GEMMs, SiLU * up, weights, un-sort, sum).
Correctness first: each arm's [T, 2048] output on layer 0 against a float64 reference from the
dequantized weights (codec.dequantize); rel L2 above 2e-2 is reported WRONG and not timed.
Timing (cold L2): ``--layers`` layers of independent weights, one experts call per layer, captured in
one CUDA graph, the median of 20 replays (bench_generation.graph_time); us per call = time / layers.
Humming plans and kernels are built before capture. Launches: CUDA events of one eager call
(torch.profiler). Humming failures (import, refusal, compile) are logged and the other arms go on.

    PYTHONPATH=/tmp/site:src HUMMING_CACHE_DIR=/tmp/hcache python3 benchmarks/bench_moe_humming.py \\
        [--t 1,2,4,8] [--layers 8] [--out PATH] [--budget-s 480]

(humming installed into /tmp/site from the carried wheel, as benchmarks/device_humming.sh does.)
First run in session 15: benchmarks/RESULTS-moe-humming.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_generation import graph_time  # noqa: E402

from nvfp4_fix import codec, expert_stack, settings  # noqa: E402
from nvfp4_fix.kernels import humming as hk  # noqa: E402

E, H, INTER, TOPK = 128, 2048, 768, 8
TOL = 2e-2
INDEXED = json.dumps({"gemm_type": "indexed"})
ARMS = ("ours", "ours, route kernel", "ours, Triton", "Humming", "Humming + routing", "bf16")


def packed(e: int, n: int, k: int, parts: int, device: str) -> tuple[torch.Tensor, ...]:
    """As sweep_moe_tiles.packed: codes [E, N, K/2], e4m3 scales [E, N, K/16], multipliers [E, parts]."""
    codes = torch.randint(0, 256, (e, n, k // 2), dtype=torch.uint8, device=device)
    scales = torch.randint(0x30, 0x70, (e, n, k // 16), dtype=torch.uint8, device=device)
    mul = torch.rand(e, parts, device=device) * 1e-3 + 1e-4
    return codes, scales.view(torch.float8_e4m3fn), mul


def expert_weights(st: expert_stack.Stacked, e: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Expert e's dense gate [I, H], up [I, H] and down [H, I]: e2m1 * e4m3 * its own multiplier."""
    i = st.gate_up_codes.shape[1] // 2
    gu, gs, gm = st.gate_up_codes[e], st.gate_up_scales[e], st.gate_up_mul[e]
    down = codec.dequantize(st.down_codes[e], st.down_scales[e], st.down_mul[e, 0], "multiplier", dtype)
    gate = codec.dequantize(gu[:i], gs[:i], gm[0], "multiplier", dtype)
    return gate, codec.dequantize(gu[i:], gs[i:], gm[1], "multiplier", dtype), down


def reference(st: expert_stack.Stacked, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """float64 sum_k w[t, k] * down_e(silu(gate_e(x_t)) * up_e(x_t)), e = idx[t, k]."""
    out = torch.zeros(x.shape, dtype=torch.float64, device=x.device)
    x64, w64 = x.double(), w.double()
    for e in sorted(set(idx.reshape(-1).tolist())):
        gate, up, down = expert_weights(st, e, torch.float64)
        t, k = (idx == e).nonzero(as_tuple=True)
        act = F.silu(x64[t] @ gate.T) * (x64[t] @ up.T)
        out.index_add_(0, t, w64[t, k, None] * (act @ down.T))
    return out


def dense_bf16(st: expert_stack.Stacked) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16 [E, 2I, H] (gate rows, then up rows) and [E, H, I], dequantized once."""
    gu = torch.empty(E, 2 * INTER, H, dtype=torch.bfloat16, device=st.down_codes.device)
    down = torch.empty(E, H, INTER, dtype=torch.bfloat16, device=st.down_codes.device)
    for e in range(E):
        gate, up, down[e] = expert_weights(st, e, torch.bfloat16)
        gu[e, :INTER], gu[e, INTER:] = gate, up
    return gu, down


def bf16_experts(gu: torch.Tensor, down: torch.Tensor, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor):
    """transformers' grouped_mm experts forward (integrations/moe.py), restated without the module."""
    grouped_mm = getattr(F, "grouped_mm", None) or torch._grouped_mm
    t, k = idx.shape
    expert, perm = torch.sort(idx.reshape(-1))
    counts = torch.zeros(E, dtype=torch.int32, device=x.device)  # histc's counts, without a host sync
    offs = counts.scatter_add_(0, expert, torch.ones_like(expert, dtype=torch.int32)).cumsum(
        0, dtype=torch.int32
    )
    h = grouped_mm(x[perm // k], gu.transpose(1, 2), offs=offs)
    y = grouped_mm(F.silu(h[:, :INTER]) * h[:, INTER:], down.transpose(1, 2), offs=offs)
    y = y * w.reshape(-1)[perm, None].to(y.dtype)
    return torch.empty_like(y).index_copy_(0, perm, y).view(t, k, -1).sum(1)


def align(idx: torch.Tensor, num_experts: int, block: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """vLLM's moe_align_block_size layout, in torch ops (no host sync, fixed shapes: graph-capturable):
    sorted_ids (int32) lists the flat pair ids p = t * top_k + k of each expert in turn (ascending), each
    expert's run padded to a multiple of ``block`` with the id T * top_k; expert_ids (int32) is the expert
    of each block; num_tokens_padded (int32 [1]) the padded length. Slots past it are never read."""
    flat, dev = idx.reshape(-1).long(), idx.device
    pairs = flat.numel()
    size = -(-(pairs + min(num_experts, pairs) * (block - 1)) // block) * block
    counts = torch.zeros(num_experts, dtype=torch.long, device=dev).scatter_add_(
        0, flat, torch.ones_like(flat)
    )
    blocks = (counts + block - 1) // block
    block_end = blocks.cumsum(0)
    order = torch.sort(flat, stable=True).indices
    expert = flat[order]
    rank = torch.arange(pairs, device=dev) - (counts.cumsum(0) - counts)[expert]
    dest = (block_end - blocks)[expert] * block + rank
    sorted_ids = torch.full((size,), pairs, dtype=torch.int32, device=dev).scatter_(0, dest, order.int())
    block_ids = torch.arange(size // block, device=dev)
    expert_ids = torch.searchsorted(block_end, block_ids, right=True).clamp_(max=num_experts - 1).int()
    return sorted_ids, expert_ids, (block_end[-1:] * block).int()


def humming_experts(codes: torch.Tensor, scales: torch.Tensor, mul: torch.Tensor) -> Any:
    """One HummingLayer of E experts, as kernels.humming.build: codes [E, N, K/2], e4m3 scales
    [E, N, K/16], multipliers [E] (compressed-tensors names; weight_global_scale = 1 / multiplier)."""
    from humming.layer import HummingLayer

    e, n, k = codes.shape[0], codes.shape[1], codes.shape[2] * 2
    if (why := hk.shape_refusal(n, k)) is not None:
        raise ValueError(why)
    with torch.cuda.device(codes.device), torch.device(codes.device):
        layer = HummingLayer(shape_n=n, shape_k=k, weight_config=hk.weight_config(), num_experts=e,
                             pad_n_to_multiple=hk.PAD_N, pad_k_to_multiple=hk.PAD_K,
                             torch_dtype=torch.bfloat16)  # fmt: skip
        layer.load_from_tensors({"weight_packed": codes.contiguous(), "weight_scale": scales.contiguous(),
                                 "weight_global_scale": (1.0 / mul.float()).contiguous()})  # fmt: skip
        layer.transform()
    return layer


def humming_trio(st: expert_stack.Stacked) -> tuple[Any, Any, Any]:
    """gate, up and down as three MoE layers, each expert with its own global scale in each."""
    i = INTER
    return (humming_experts(st.gate_up_codes[:, :i], st.gate_up_scales[:, :i], st.gate_up_mul[:, 0]),
            humming_experts(st.gate_up_codes[:, i:], st.gate_up_scales[:, i:], st.gate_up_mul[:, 1]),
            humming_experts(st.down_codes, st.down_scales, st.down_mul[:, 0]))  # fmt: skip


def indexed_configs(trio: tuple[Any, ...], pairs: int) -> list[tuple[int, str]]:
    """(block M, tuning config JSON) of each layer's heuristic indexed kernel for ``pairs`` routed rows;
    passed explicitly so the routing tables' block size is the kernel's."""
    from humming.tune import get_heuristics_config

    out = []
    for layer in trio:
        cfg = get_heuristics_config(layer.humming_config, shape_m=pairs, gemm_type="indexed",
                                    device=layer.weight.device)  # fmt: skip
        out.append((int(cfg["block_shape"][0]), json.dumps(cfg)))
    return out


def humming_call(trio, cfgs, tables, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """gate and up: two indexed MoE GEMMs over x (row p = t * top_k + k); silu(gate) * up; down over the
    pairs (top_k 1); then the routing weights and the sum over each token's pairs in one bmm."""
    t, k = idx.shape
    if tables is None:  # "+ routing": the tables are part of the call
        tables = {b: align(idx, E, b) for b in {b for b, _ in cfgs}}

    def mm(j: int, inputs: torch.Tensor, top_k: int) -> torch.Tensor:
        sid, eid, ntp = tables[cfgs[j][0]]
        return trio[j](inputs, sorted_ids=sid, expert_ids=eid, num_tokens_padded=ntp, top_k=top_k,
                       compute_config=INDEXED, tuning_config=cfgs[j][1])  # fmt: skip

    act = F.silu(mm(0, x, k)).mul_(mm(1, x, k))
    y = mm(2, act, 1)
    return torch.bmm(w.view(t, 1, k).to(y.dtype), y.view(t, k, -1)).view(t, -1)


def route_kernel_experts(st: expert_stack.Stacked, *data: torch.Tensor) -> torch.Tensor:
    """grouped_forward with settings.moe_route_kernel on: the pairs sorted by one Triton program."""
    with settings.override(moe_route_kernel=True):
        return expert_stack.grouped_forward(st, *data, torch.nn.SiLU(), False)


def triton_experts(st: expert_stack.Stacked, *data: torch.Tensor) -> torch.Tensor:
    """grouped_forward with settings.cuda_moe off: the Triton kernels (decode and grouped tl.dot)."""
    with settings.override(cuda_moe=False):
        return expert_stack.grouped_forward(st, *data, torch.nn.SiLU(), False)


def launches(call: Callable[[], Any]) -> int:
    from torch.profiler import ProfilerActivity, profile

    call()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        call()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def short(err: Exception) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0][:200] if text else ''}"


def measure(name: str, calls: list[Callable[[], Any]], want: torch.Tensor, notes: list[str], t: int) -> dict:
    """Rel L2 of layer 0's output against ``want``, then (if within TOL) launches and us per call."""
    try:
        err = float((calls[0]().double() - want).norm() / want.norm())
        if not err < TOL:
            return {name: f"WRONG ({err:.1e})", f"err {name}": err}
        return {
            name: 1000 * graph_time(lambda: [c() for c in calls]) / len(calls),
            f"err {name}": err,
            f"n {name}": launches(calls[0]),
        }
    except Exception as e:  # noqa: BLE001 - e.g. a Humming refusal, compile or capture error: keep going
        notes.append(f"T={t} {name}: {short(e)}")
        return {name: "failed"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--t", default="1,2,4,8", help="tokens per call (128 also runs: the grouped path)")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--out", default=None, help="also write the markdown here (a folder: into it)")
    ap.add_argument("--budget-s", type=float, default=480.0, help="skip T values that would start past this")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA device")
        return 2
    t0, dev = time.perf_counter(), torch.device("cuda", torch.cuda.current_device())
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    torch.manual_seed(args.seed)
    layers = [expert_stack.Stacked(*packed(E, 2 * INTER, H, 2, "cuda"), *packed(E, H, INTER, 1, "cuda"), None)
              for _ in range(args.layers)]  # fmt: skip
    dense = [dense_bf16(st) for st in layers]
    notes: list[str] = []
    trios: list[Any] | None = None
    why = hk.unavailable_reason(dev)
    if why is None:
        try:
            trios = [humming_trio(st) for st in layers]
        except Exception as err:  # noqa: BLE001 - a refusal or compile error: the other arms go on
            why = f"build failed: {short(err)}"
    if why is not None:
        notes.append(f"Humming: {why}")
        log(f"Humming: {why}")
    log(f"built {args.layers} layers in {time.perf_counter() - t0:.0f} s")

    silu = torch.nn.SiLU()
    rows = []
    for t in [int(v) for v in args.t.split(",")]:
        if time.perf_counter() - t0 > args.budget_s:
            notes.append(f"T={t}: skipped (--budget-s {args.budget_s:.0f} spent)")
            continue
        g = torch.Generator(device="cuda").manual_seed(1000 + t)
        data = []
        for _ in layers:
            idx = torch.rand(t, E, generator=g, device="cuda").argsort(-1)[:, :TOPK].contiguous()
            w = torch.rand(t, TOPK, generator=g, device="cuda").softmax(-1).to(torch.bfloat16)
            data.append((torch.randn(t, H, generator=g, device="cuda", dtype=torch.bfloat16), idx, w))
        arms: dict[str, list[Callable[[], Any]]] = {
            "ours": [lambda st=st, d=d: expert_stack.grouped_forward(st, *d, silu, False)
                     for st, d in zip(layers, data, strict=True)],
            "ours, route kernel": [lambda st=st, d=d: route_kernel_experts(st, *d)
                                   for st, d in zip(layers, data, strict=True)],
            "ours, Triton": [lambda st=st, d=d: triton_experts(st, *d)
                             for st, d in zip(layers, data, strict=True)],
            "bf16": [lambda m=m, d=d: bf16_experts(*m, *d) for m, d in zip(dense, data, strict=True)],
        }  # fmt: skip
        if trios is not None:
            try:
                cfgs = indexed_configs(trios[0], t * TOPK)
                tables = [{b: align(d[1], E, b) for b, _ in cfgs} for d in data]
                arms["Humming"] = [lambda h=h, c=cfgs, tb=tb, d=d: humming_call(h, c, tb, *d)
                                   for h, tb, d in zip(trios, tables, data, strict=True)]  # fmt: skip
                arms["Humming + routing"] = [lambda h=h, c=cfgs, d=d: humming_call(h, c, None, *d)
                                             for h, d in zip(trios, data, strict=True)]  # fmt: skip
                log(f"T={t}: Humming indexed configs (block M, config): {cfgs}")
            except Exception as err:  # noqa: BLE001
                notes.append(f"T={t}: Humming configs failed: {short(err)}")
        want = reference(layers[0], *data[0])
        row: dict[str, Any] = {"T": t}
        for name in (a for a in ARMS if a in arms):
            row |= measure(name, arms[name], want, notes, t)
            log(f"T={t} {name}: {row[name]}, rel err {row.get(f'err {name}', float('nan')):.1e}")
        rows.append(row)
        del arms, data

    text = table(rows, notes, args.layers)
    print(text)
    if args.out:
        out = Path(args.out)
        (out / "bench_moe_humming.md" if out.is_dir() else out).write_text(text)
    return 0


def table(rows: list[dict], notes: list[str], n_layers: int) -> str:
    import triton

    hv = getattr(hk._humming(), "__version__", "not installed")

    def us(v: Any) -> str:
        return f"{v:.1f}" if isinstance(v, float) else (v or "-")

    def ratio(r: dict, arm: str) -> str:
        ok = all(isinstance(r.get(k), float) for k in (arm, "ours"))
        return f"{r[arm] / r['ours']:.2f}x" if ok else "-"

    lines = [
        f"# Decode MoE experts: {torch.cuda.get_device_name()}; torch {torch.__version__}, triton "
        f"{triton.__version__}, humming-kernels {hv}; cuda_moe setting {settings.current().cuda_moe}",
        "",
        f"E={E}, H={H}, I={INTER}, top-{TOPK}; {n_layers} layers per graph (cold L2); us per experts call. "
        "Humming: gate and up as two MoE GEMMs (gate and up global scales differ per expert), silu * up, "
        "down, weights + sum; '+ routing': its tables built in the call. ours vs X = X us / ours us.",
        "",
        "| T | ours us | ours, route kernel us | ours, Triton us | Humming us | Humming + routing us "
        "| bf16 us | ours vs Humming | ours vs bf16 "
        "| launches ours / route kernel / Triton / Humming / + routing / bf16 "
        "| rel err ours / route kernel / Triton / Humming / + routing / bf16 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        n = " / ".join(str(r.get(f"n {a}", "-")) for a in ARMS)
        err = " / ".join(f"{r[k]:.1e}" if (k := f"err {a}") in r else "-" for a in ARMS)
        cells = [str(r["T"]), *(us(r.get(a)) for a in ARMS), ratio(r, "Humming"), ratio(r, "bf16"), n, err]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Tolerance: rel L2 < {TOL} against float64 from the dequantized weights.", *notes]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
