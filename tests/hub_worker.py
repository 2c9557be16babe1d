"""Run as a script by test_hub.py, in a fresh process with ``HF_HUB_OFFLINE=1`` and ``HF_HUB_CACHE``
pointing at a cache that test built: load checkpoints by hub id through transformers' own entry points
and report, as one JSON object on the last line of stdout, what each case gave.

    python hub_worker.py OUT_DIR CASE [CASE ...]

Logits of each case go to OUT_DIR/<case>.pt, for the test to compare with a local-folder load.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

import torch

IDS = torch.randint(5, 500, (1, 12), generator=torch.Generator().manual_seed(7))


def packed(model: torch.nn.Module) -> int:
    return sum(
        1
        for m in model.modules()
        if type(m).__name__ == "NVFP4Linear" and m.weight_packed.dtype == torch.uint8
    )


def logits_of(model: torch.nn.Module, **extra: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=IDS, **extra)
    return (out.logits if hasattr(out, "logits") else out.last_hidden_state).float()


def case(name: str) -> tuple[dict, torch.Tensor | None]:
    import transformers
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    kind, _, arg = name.partition(":")
    if kind == "plain":  # a non-NVFP4 model by id, without and with the patch
        before = logits_of(AutoModelForCausalLM.from_pretrained(arg))
        import nvfp4_fix

        nvfp4_fix.apply_patch()
        after = logits_of(AutoModelForCausalLM.from_pretrained(arg))
        return {"equal": bool(torch.equal(before, after))}, after
    if kind == "hook":  # nothing of ours imported: the persistent start-up hook must do it all
        model = AutoModelForCausalLM.from_pretrained(arg)
        return {"packed": packed(model), "nvfp4_imported": "nvfp4_fix" in sys.modules}, logits_of(model)
    if kind == "own":  # nvfp4_fix.from_pretrained by id, class from config.architectures
        import nvfp4_fix

        repo, _, rev = arg.partition("@")
        model = nvfp4_fix.from_pretrained(repo, **({"revision": rev} if rev else {}))
        return {"packed": packed(model), "class": type(model).__name__}, None
    if kind == "cli":
        from nvfp4_fix.cli import main

        return {"exit": main(arg.split())}, None

    import nvfp4_fix

    nvfp4_fix.apply_patch()
    if kind == "causal":
        repo, _, rev = arg.partition("@")
        repo, _, sub = repo.partition("#")
        kw = {"revision": rev} if rev else {}
        if sub:
            kw["subfolder"] = sub
        model, info = AutoModelForCausalLM.from_pretrained(repo, output_loading_info=True, **kw)
        report = {"packed": packed(model), "is_quantized": bool(getattr(model, "is_quantized", False))}
        report["quantizer"] = type(getattr(model, "hf_quantizer", None)).__name__
        report["missing"] = sorted(info["missing_keys"])
        report["unexpected"] = sorted(info["unexpected_keys"])
        return report, logits_of(model)
    if kind == "base":
        model = AutoModel.from_pretrained(arg)
        return {"packed": packed(model), "class": type(model).__name__}, logits_of(model)
    if kind == "seqcls":
        model, info = AutoModelForSequenceClassification.from_pretrained(
            arg, num_labels=2, output_loading_info=True
        )
        score = model.score.weight
        report = {"packed": packed(model), "missing": sorted(info["missing_keys"])}
        report["score_std"] = float(score.float().std())
        return report, logits_of(model)
    if kind == "vlm":
        model = transformers.AutoModelForImageTextToText.from_pretrained(arg)
        return {"packed": packed(model), "class": type(model).__name__}, None
    if kind == "pipeline":
        pipe = transformers.pipeline("text-generation", model=arg)
        text = pipe("Return the", max_new_tokens=5, do_sample=False)[0]["generated_text"]
        return {"packed": packed(pipe.model), "text": text}, None
    raise ValueError(f"unknown case {name!r}")


def main() -> None:
    out = Path(sys.argv[1])
    results = {}
    for i, name in enumerate(sys.argv[2:]):
        try:
            report, logits = case(name)
            report["ok"] = True
            if logits is not None:
                torch.save(logits, out / f"{i}.pt")
        except BaseException as e:  # noqa: BLE001 - reported to the test, which asserts on it
            report = {
                "ok": False,
                "error": f"{type(e).__name__}: {e}",
                "trace": traceback.format_exc()[-3000:],
            }
        results[name] = report
    print(json.dumps(results))


if __name__ == "__main__":
    main()
