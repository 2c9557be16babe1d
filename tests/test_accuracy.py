"""Accuracy with real trained weights: the demo model (trained here on stdlib docstrings) quantized by
llmcompressor and ModelOpt, against its bf16 original, on held-out text neither training nor
calibration saw. Measured when written (tests/fixtures/demo/README.md): weight-only top-1 agreement
0.958 and perplexity 61.99 vs 61.95; W4A4 0.912 and 62.38. The bounds leave room for kernel
rounding, not for a wrong scale (which gives agreement near 0 and perplexity in the thousands).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nvfp4_fix.loading import from_pretrained

DEMO = Path(__file__).parent / "fixtures" / "demo"
CASES = {  # name: (min top-1 agreement, max perplexity ratio)
    "ct-nvfp4a16": (0.93, 1.01),
    "modelopt-w4a16_nvfp4": (0.93, 1.01),
    "ct-nvfp4": (0.88, 1.02),
    "modelopt-nvfp4": (0.88, 1.02),
}
CASES = {k: v for k, v in CASES.items() if (DEMO / k).exists()}


@pytest.fixture(scope="module")
def heldout() -> tuple[torch.Tensor, torch.Tensor]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(DEMO / "bf16")
    ids = tok((DEMO / "heldout.txt").read_text(), return_tensors="pt")["input_ids"][:, :1024]
    bf16 = AutoModelForCausalLM.from_pretrained(DEMO / "bf16", torch_dtype=torch.float32).eval()
    with torch.no_grad():
        ref = torch.cat([bf16(input_ids=c).logits[0] for c in ids.split(256, dim=1)])
    return ids, ref


def _perplexity(logits: torch.Tensor, ids: torch.Tensor) -> float:
    chunks = ids[0].split(256)
    losses, n = 0.0, 0
    start = 0
    for c in chunks:
        lg = logits[start : start + len(c)]
        losses += torch.nn.functional.cross_entropy(lg[:-1], c[1:], reduction="sum").item()
        n += len(c) - 1
        start += len(c)
    return float(torch.exp(torch.tensor(losses / n)))


def agreement(model, ids: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(top-1 agreement with the bf16 reference logits, perplexity ratio) of ``model`` on ``ids``."""
    with torch.no_grad():
        got = torch.cat([model(input_ids=c).logits[0] for c in ids.split(256, dim=1)])
    agree = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    return agree, _perplexity(got, ids) / _perplexity(ref, ids)


@pytest.mark.parametrize("name", list(CASES))
def test_nvfp4_agrees_with_bf16_on_heldout_text(name: str, heldout) -> None:
    ids, ref = heldout
    agree, ratio = agreement(from_pretrained(DEMO / name, dtype=torch.float32), ids, ref)
    min_agree, max_ratio = CASES[name]
    assert agree >= min_agree and ratio <= max_ratio, (agree, ratio)
