"""Run as a script, in a fresh process, by test_compat.py: load fixtures through plain transformers +
compressed-tensors and report what happens, so no patch leaks into the test process.

    python ct_worker.py OUT_DIR CASE [CASE ...]     CASE = fixture:mode:dtype:patch[:lowmem]

mode is ``default`` (run_compressed=True) or ``dense`` (run_compressed=False); dtype ``auto`` leaves
transformers' default (float16 in 4.57); patch is ``patch`` (apply_patch(packed_layers=False)) or
``plain``. Prints one JSON list; logits of successful cases go to OUT_DIR/<n>.pt.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

import torch


def run_case(case: str, out: Path, index: int) -> dict:
    fixture, mode, dtype, patch, *flags = case.split(":")
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    kwargs: dict = {}
    if mode == "dense":
        kwargs["quantization_config"] = CompressedTensorsConfig(run_compressed=False)
    if dtype != "auto":
        kwargs["torch_dtype"] = getattr(torch, dtype)
    result: dict = {"case": case, "ok": False}
    try:
        model = AutoModelForCausalLM.from_pretrained(fixture, **kwargs)
        ids = torch.randint(3, 500, (2, 11), generator=torch.Generator().manual_seed(1234))

        def cached() -> int:
            return sum("weight" in m._parameters for m in model.modules() if hasattr(m, "weight_packed"))

        with torch.no_grad():
            logits = model(input_ids=ids).logits.float()
            result["dense_cached"] = cached()
            if "lowmem" in flags:
                import nvfp4_fix.patch as p

                result["lowmem_dropped"] = p.enable_low_memory_mode(True, model)
                again = model(input_ids=ids).logits.float()
                result["lowmem_dense_cached"] = cached()
                result["lowmem_rel_diff"] = float((again - logits).norm() / logits.norm())
                p.enable_low_memory_mode(False)
        torch.save(logits, out / f"{index}.pt")
        result.update(ok=True, logits=str(out / f"{index}.pt"), dtype=str(model.dtype))
    except Exception as exc:
        tb = traceback.extract_tb(exc.__traceback__)
        result.update(error_type=type(exc).__name__, error=str(exc)[:2000], where=tb[-1].name if tb else "")
    return result


def main() -> None:
    out = Path(sys.argv[1])
    cases = sys.argv[2:]
    if any(c.split(":")[3] == "patch" for c in cases):
        import nvfp4_fix.patch as p

        p.apply_patch(packed_layers=False)
    print(json.dumps([run_case(c, out, i) for i, c in enumerate(cases)]))


if __name__ == "__main__":
    main()
