"""What the opt-in NVFP4 lm_head (``from_pretrained(..., quantize_lm_head=True)``) costs in accuracy:
logits relative L2 error and teacher-forced greedy top-1 agreement of the quantized-lm_head model
against the same checkpoint with its dense lm_head, over a few hundred positions.

    PYTHONPATH=src python benchmarks/lmhead_accuracy.py [--positions 512]

runs the real-model part on the CPU in float32: the demo model (tests/fixtures/demo, trained here,
quantized by llmcompressor and ModelOpt) on held-out text, each checkpoint also against its bf16
original. bench_generation.py prints the same figures for its random 8B-shaped model
(:func:`compare`) next to its timings.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

DEMO = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "demo"
CHECKPOINTS = ("ct-nvfp4a16", "modelopt-w4a16_nvfp4", "ct-nvfp4", "modelopt-nvfp4")


def logits_of(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Teacher-forced float32 logits [positions, vocab] of a [1, P] prompt (one forward)."""
    with torch.no_grad():
        return model(input_ids=ids).logits[0].float()


def stats(got: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """Relative L2 error (float64) and top-1 agreement of logits ``got`` against ``ref``."""
    g, r = got.double(), ref.double()
    return {
        "rel_l2": float((g - r).norm() / r.norm()),
        "top1": float((got.argmax(-1) == ref.argmax(-1)).double().mean()),
        "positions": int(ref.shape[0]),
    }


def compare(dense: torch.nn.Module, quantized: torch.nn.Module, ids: torch.Tensor) -> dict[str, float]:
    """The quantized-lm_head model against the dense-lm_head one on prompt ``ids`` [1, P]."""
    return stats(logits_of(quantized, ids), logits_of(dense, ids))


def perplexity(windows: tuple[torch.Tensor, ...], logits: torch.Tensor) -> float:
    """Next-token perplexity of ``logits`` (the windows' positions, concatenated) on the windows."""
    nll, n, start = 0.0, 0, 0
    for w in windows:
        k = w.shape[1]
        lg = logits[start : start + k - 1].double()
        nll += float(torch.nn.functional.cross_entropy(lg, w[0, 1:], reduction="sum"))
        n, start = n + k - 1, start + k
    return float(torch.exp(torch.tensor(nll / n)))


def line(what: str, s: dict[str, float]) -> str:
    return (
        f"{what}: logits rel L2 {s['rel_l2']:.4f}, greedy top-1 agreement {s['top1']:.4f} "
        f"over {s['positions']} positions"
    )


def heldout_ids(positions: int) -> torch.Tensor:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(DEMO / "bf16")
    return tok((DEMO / "heldout.txt").read_text(), return_tensors="pt")["input_ids"][:, :positions]


def demo_lines(positions: int = 512, names: tuple[str, ...] = CHECKPOINTS) -> list[str]:
    """One line per demo checkpoint: quantized lm_head vs dense lm_head, and each vs bf16."""
    from transformers import AutoModelForCausalLM

    import nvfp4_fix

    windows = heldout_ids(positions).split(256, dim=1)  # the demo model's context is 256 tokens
    bf16 = AutoModelForCausalLM.from_pretrained(DEMO / "bf16", dtype=torch.float32).eval()

    def all_logits(model: torch.nn.Module) -> torch.Tensor:
        return torch.cat([logits_of(model, w) for w in windows])

    ref = all_logits(bf16)
    lines = []
    for name in names:
        if not (DEMO / name).is_dir():
            continue
        dense = nvfp4_fix.from_pretrained(DEMO / name, dtype=torch.float32)
        quant = nvfp4_fix.from_pretrained(DEMO / name, dtype=torch.float32, quantize_lm_head=True)
        d, q = all_logits(dense), all_logits(quant)
        s = stats(q, d)
        vs_d, vs_q = stats(d, ref), stats(q, ref)
        ppl = [perplexity(windows, x) for x in (ref, d, q)]
        lines.append(
            line(f"demo {name} (CPU, float32), NVFP4 lm_head vs dense lm_head", s)
            + f"; top-1 vs the bf16 original {vs_d['top1']:.4f} (dense lm_head) -> {vs_q['top1']:.4f}"
            + f" (NVFP4 lm_head); held-out perplexity bf16 {ppl[0]:.2f}, {ppl[1]:.2f} -> {ppl[2]:.2f}"
        )
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--positions", type=int, default=512)
    args = ap.parse_args()
    torch.manual_seed(0)
    for x in demo_lines(args.positions):
        print(x, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
