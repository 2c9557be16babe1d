"""MoE router at decode (issue 19): the logits GEMM and the softmax top-k, per layer, in a CUDA graph.

48 routers of Qwen3-30B-A3B's shape (128 experts, hidden 2048, top-8, bf16) back to back on one stream
(``--feed``: each fed the previous one's output, two more launches a router), captured in one graph per
method; replays timed (bench_generation.graph_time: the median of 20), all methods in the same run:
  transformers: F.linear, softmax, torch.topk, divide (the class's own math);
  linear + softmax_topk: F.linear (cuBLAS), then kernels.moe_router.softmax_topk (the default before);
  router_topk: the logits and the top k in one launch (kernels.moe_router.router_topk).
Each method's choice is compared with torch.topk's on the same logits by the logits it picked, not by
the ids: bf16 logits tie often, and of equal logits the kernels take the lowest id, torch.topk any.

Usage (CUDA): python benchmarks/bench_router.py [--tokens 1] [--layers 48] [--feed]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_generation import graph_time  # noqa: E402

from nvfp4_fix.kernels import moe_router  # noqa: E402
from nvfp4_fix.kernels.moe_router import router_topk, softmax_topk, softmax_topk_reference  # noqa: E402


def transformers_math(x, w, k):
    logits = F.linear(x, w)
    return (logits, *softmax_topk_reference(logits, k, True))


def linear_then_topk(x, w, k):
    logits = F.linear(x, w)
    return (logits, *softmax_topk(logits, k, True))


def fused(x, w, k):
    return router_topk(x, w, k, True)


def same_choice(logits: torch.Tensor, ids: torch.Tensor, k: int) -> bool:
    """Whether ``ids`` pick top-k logits (the same values as torch.topk's pick, in any order of ties)."""
    ref = softmax_topk_reference(logits, k, True)[1]
    return torch.equal(logits.gather(-1, ids).sort(-1).values, logits.gather(-1, ref).sort(-1).values)


def chain(method, x, weights, k, feed: bool = True):
    outs = []
    for w in weights:
        logits, vals, ids = method(x, w, k)
        outs.append((logits, ids))
        if feed:  # depend on the previous router (two more small launches a router)
            x = x + vals.sum(-1, keepdim=True).to(x.dtype)
    return outs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=1)
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--feed", action="store_true", help="each router's input is the previous one's output")
    ap.add_argument("--parts", default="", help="also router_topk at these programs a token: 16,64,128")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA device")
        return 2
    g = torch.Generator(device="cuda").manual_seed(0)
    weights = [
        (torch.randn(128, 2048, device="cuda", generator=g) / 16).to(torch.bfloat16)
        for _ in range(args.layers)
    ]
    x = torch.randn(args.tokens, 2048, device="cuda", generator=g).to(torch.bfloat16)
    card = torch.cuda.get_device_name()
    head = f"{card}: {args.layers} routers, {args.tokens} token(s)"
    print(f"| {head} | us a router | routers whose pick is top-k of their logits |")
    print("|---|---:|---:|")
    for name, method in (("transformers", transformers_math), ("linear + softmax_topk", linear_then_topk),
                         ("router_topk (one launch)", fused)):  # fmt: skip
        ms = graph_time(lambda method=method: chain(method, x, weights, 8, args.feed))
        outs = chain(method, x, weights, 8, args.feed)
        same = sum(same_choice(lg, ids, 8) for lg, ids in outs)
        print(f"| {name} | {1000 * ms / args.layers:.2f} | {same} / {len(outs)} |")
    default = moe_router.PARTS
    for parts in [int(p) for p in args.parts.split(",") if p]:
        moe_router.PARTS = parts
        ms = graph_time(lambda: chain(fused, x, weights, 8, args.feed))
        print(f"| router_topk, {parts} programs a token | {1000 * ms / args.layers:.2f} | |")
    moe_router.PARTS = default
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
