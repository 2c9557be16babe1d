"""Load a checkpoint with nvfp4-fix and check it: every quantized layer stayed packed (NVFP4: uint8
codes, e4m3 block scales; FP8: e4m3 weights), a sample of layers (first and last of each layer pattern
and kind) holds the checkpoint's bytes and computes what an independent float64 dequantization of the
checkpoint computes, and one forward of the whole model gives finite logits. Prints the worst error per
layer type; exit code 1 on failure."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from ..checkpoint import COMPRESSED_TENSORS, CheckpointInfo, layer_pattern
from ..errors import CheckpointError
from ..tools import fp8_reference

HELP = "load packed, compare layers with a float64 reference, run one forward"

#: Relative L2 error allowed for a layer's output, by model dtype (output rounding dominates).
TOLERANCE = {"torch.float32": 1e-4, "torch.bfloat16": 1e-2, "torch.float16": 2e-3}
#: Extra allowance when activations are fake-quantized too (a rare e4m3 scale rounding flip).
ACT_TOLERANCE = 2e-2


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="checkpoint folder or hub id (org/model)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    p.add_argument("--dtype", default="auto", help="bf16, fp16, fp32 or auto (config's dtype)")
    p.add_argument("--all", action="store_true", help="compare every quantized layer, not a sample")
    p.add_argument("--seed", type=int, default=0)


def e2m1_float64(codes: Any) -> Any:
    """E2M1 code -> value from the bit fields (sign, 2-bit exponent, 1-bit mantissa), in float64."""
    import torch

    c = codes.to(torch.int64)
    sign = 1.0 - 2.0 * ((c >> 3) & 1).to(torch.float64)
    exp, man = (c >> 1) & 3, (c & 1).to(torch.float64)
    mag = torch.where(exp == 0, 0.5 * man, torch.pow(2.0, (exp - 1).to(torch.float64)) * (1.0 + 0.5 * man))
    return sign * mag


def reference_weight(tensors: dict[str, Any], prefix: str, info: CheckpointInfo) -> Any:
    """Float64 W from the checkpoint's own tensors, written independently of nvfp4_fix.codec."""
    import torch

    ct = info.format == COMPRESSED_TENSORS
    packed = tensors[info.packed_name(prefix)].view(torch.uint8)  # safetensors F4 reads as float4 pairs
    low, high = packed & 0x0F, packed >> 4
    codes = torch.stack((low, high), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)
    scale = tensors[prefix + ".weight_scale"].to(torch.float64)
    w = e2m1_float64(codes) * scale.repeat_interleave(16, dim=-1)
    glob = (
        tensors[prefix + (".weight_global_scale" if ct else ".weight_scale_2")].to(torch.float64).reshape(())
    )
    return w / glob if ct else w * glob


def reference_act_quant(x: Any, divisor: float, dtype: Any) -> Any:
    """NVFP4 quantize-dequantize of activations per 16 columns, written from compressed-tensors'
    definition: s = e4m3(global * (amax / 6)) with amax / 6 rounded to the activation dtype first,
    x / (s / global) in float32 rounded to the nearest E2M1 value (ties to the even code), the result
    rounded to the activation dtype. Float32 where compressed-tensors computes in float32: an exact
    float64 division would land on the other side of a tie now and then."""
    import torch

    grid = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float64)
    g = x.reshape(*x.shape[:-1], -1, 16)
    local = (g.abs().amax(-1, keepdim=True) / 6.0).to(dtype).to(torch.float64)
    s = (divisor * local).clamp(max=448.0).to(torch.float8_e4m3fn).to(torch.float32)
    s = torch.where(s == 0, torch.full_like(s, 0.125), s)  # compressed-tensors: finfo(e4m3).eps
    step = s / torch.tensor(divisor, dtype=torch.float32)
    v = (g.to(torch.float32) / step).clamp(-6, 6).to(torch.float64)
    dist = (v.abs().unsqueeze(-1) - grid).abs()
    best = dist == dist.min(-1, keepdim=True).values
    odd = torch.arange(8) % 2 == 1
    idx = torch.where(best & ~odd, 0, 1).argmin(-1)  # an even code among the nearest, if there is one
    idx = torch.where(best.gather(-1, idx.unsqueeze(-1)).squeeze(-1), idx, best.to(torch.int8).argmax(-1))
    q = grid[idx] * v.sign()
    return (q * step.to(torch.float64)).to(dtype).to(torch.float64).reshape(x.shape)


def _module_names(model: Any, prefixes: list[str]) -> dict[str, str]:
    """Checkpoint prefix -> name of the NVFP4Linear or FP8Linear holding it: the same name, a name the
    loader's key renaming gives (e.g. language_model.model.layers -> model.language_model.layers), or the one
    module whose name ends with the longest unique tail of the prefix."""
    from ..fp8 import FP8Linear
    from ..layer import NVFP4Linear

    names = [n for n, m in model.named_modules() if isinstance(m, (NVFP4Linear, FP8Linear))]
    exact = set(names)
    try:
        from ..swap import name_candidates as _renamer

        candidates = _renamer(model)
    except Exception:  # the loader's private helper changed: fall back to matching tails
        candidates = None
    out: dict[str, str] = {}
    for p in prefixes:
        found = [c[: -len(".weight")] for c in (candidates(p + ".weight") if candidates else [p + ".weight"])]
        hit = next((c for c in found if c in exact), None)
        parts = p.split(".")
        for i in range(len(parts)):
            if hit is not None:
                break
            tail = ".".join(parts[i:])
            match = [n for n in names if n == tail or n.endswith("." + tail)]
            if len(match) > 1:
                break
            hit = match[0] if match else None
        if hit is not None:
            out[p] = hit
    return out


def sample(prefixes: list[str], everything: bool) -> list[str]:
    if everything:
        return sorted(prefixes)
    by_pattern: dict[str, list[str]] = {}
    for p in prefixes:
        by_pattern.setdefault(layer_pattern(p), []).append(p)

    def index(p: str) -> list[int]:
        return [int(x) for x in p.split(".") if x.isdigit()]

    picked: list[str] = []
    for members in by_pattern.values():
        members.sort(key=index)
        picked += dict.fromkeys([members[0], members[-1]])
    return picked


def verify(
    path: str, device: str = "cpu", dtype: str = "auto", everything: bool = False, seed: int = 0
) -> dict[str, Any]:
    from ..tools import runtime

    model, info, load_s = runtime.load(path, device, dtype)
    return verify_model(model, info, load_s, device, everything, seed)


def _not_kept(module: Any, scheme: str) -> bool:
    """A layer that does not hold its checkpoint's format: NVFP4 uint8 codes + e4m3 scales, FP8 e4m3."""
    import torch

    from ..fp8 import FP8Linear

    if scheme == "fp8":
        return not isinstance(module, FP8Linear) or module.weight.dtype != torch.float8_e4m3fn
    return (
        getattr(module, "weight_packed", None) is None
        or module.weight_packed.dtype != torch.uint8
        or module.weight_scale.dtype != torch.float8_e4m3fn
        or module.dense_weight is not None
    )


def verify_model(
    model: Any, info: CheckpointInfo, load_s: float, device: str, everything: bool = False, seed: int = 0
) -> dict[str, Any]:
    """The checks of :func:`verify` on an already loaded model."""
    import torch
    from safetensors import safe_open

    from ..tools import progress

    mdtype = next(
        p.dtype for p in model.parameters() if p.is_floating_point() and p.dtype != torch.float8_e4m3fn
    )
    tol = TOLERANCE.get(str(mdtype), 1e-2)
    names = _module_names(model, list(info.quantized))
    modules = dict(model.named_modules())
    failures: list[str] = []
    missing = [p for p in info.quantized if p not in names]
    if missing:
        failures.append(
            f"{len(missing)} quantized layers have no packed NVFP4Linear / FP8Linear in the model, "
            f"e.g. {missing[0]}"
        )
    not_packed = [n for p, n in names.items() if _not_kept(modules[n], info.quantized[p].scheme)]
    if not_packed:
        failures.append(
            f"{len(not_packed)} layers do not hold their checkpoint format (NVFP4 uint8 + e4m3, FP8 e4m3), "
            f"e.g. {not_packed[0]}"
        )
    gen = torch.Generator().manual_seed(seed)
    worst: dict[str, dict[str, Any]] = {}
    picked = [
        p for p in sample(list(info.quantized), everything) if p in names and names[p] not in not_packed
    ]
    with torch.no_grad():
        for prefix in progress.track(picked, desc="comparing layers", unit="layer"):
            mod = modules[names[prefix]]
            tensors: dict[str, Any] = {}
            for key in (n for n in info.tensors if n.rpartition(".")[0] == prefix):
                try:
                    with safe_open(str(info.tensors[key].file), framework="pt", device="cpu") as f:
                        tensors[key] = f.get_tensor(key)
                except Exception as e:  # a file the header check passed but safetensors refuses
                    raise CheckpointError(
                        f"{info.tensors[key].file}: cannot read tensor {key!r} ({e})"
                    ) from None
            q = info.quantized[prefix]
            stored = mod.weight if q.scheme == "fp8" else mod.weight_packed
            name = prefix + ".weight" if q.scheme == "fp8" else info.packed_name(prefix)
            if not torch.equal(stored.detach().cpu().view(torch.uint8), tensors[name].view(torch.uint8)):
                failures.append(f"{prefix}: packed bytes differ from the checkpoint's")
            if q.scheme == "fp8":
                w = fp8_reference.reference_weight(tensors[name], tensors[prefix + ".weight_scale"], q.fp8)
            else:
                w = reference_weight(tensors, prefix, info)
            pqs = tensors.get(prefix + ".pre_quant_scale")
            bias = mod.bias.detach().cpu().to(torch.float64) if mod.bias is not None else 0.0

            def inputs(spread: float, mod: Any = mod, pqs: Any = pqs) -> tuple[Any, Any]:
                """x in the model dtype, and what the layer multiplies by W after the AWQ scale."""
                x = (torch.randn(4, mod.in_features, generator=gen, dtype=torch.float64) * spread).to(mdtype)
                x64 = x.to(torch.float64)
                if pqs is not None:  # the layer scales in the activation dtype
                    x64 = (x64 * pqs.to(mdtype).to(torch.float64)).to(mdtype).to(torch.float64)
                return x, x64

            x, x64 = inputs(1.0)
            checks = [("weights", "bf16", x, x64, tol)]
            divisor = getattr(mod, "input_divisor", None)
            if q.scheme == "fp8" and q.fp8 is not None and q.fp8.activations != "none":
                s = tensors.get(prefix + ".input_scale")
                s = float(s.reshape(-1)[0]) if s is not None else None
                xa, xa64 = inputs(1.0 if s is None else 448 * s / 3)  # static: within the calibrated range
                xq = fp8_reference.reference_act_quant(xa64, q.fp8, s, mdtype)
                checks.append(("weights+activations", "quantize", xa, xq, tol + ACT_TOLERANCE))
            elif divisor is not None:
                g = float(divisor.reshape(-1)[0])
                # activations in the calibrated range (amax = 6 * 448 / global), as real ones are
                xa, xa64 = inputs(6 * 448 / g / 3)
                xq = reference_act_quant(xa64, g, mdtype)
                checks.append(("weights+activations", "quantize", xa, xq, tol + ACT_TOLERANCE))
            saved = mod.activation_mode
            try:
                for what, mode, xin, ref_in, limit in checks:
                    mod.activation_mode = mode
                    y = mod(xin.to(stored.device)).detach().cpu().to(torch.float64)
                    ref = ref_in @ w.t() + bias
                    err = float((y - ref).norm() / ref.norm().clamp(min=1e-30))
                    kind = (
                        prefix.rpartition(".")[2]
                        + (" FP8" if q.scheme == "fp8" else "")
                        + ("" if what == "weights" else " (activations quantized)")
                    )
                    entry = worst.setdefault(
                        kind, {"layers": 0, "error": 0.0, "tolerance": limit, "where": prefix}
                    )
                    entry["layers"] += 1
                    if not err <= entry["error"]:
                        entry.update(error=err, where=prefix)
                    if not err <= limit:
                        failures.append(
                            f"{prefix}: {what} output differs from the float64 reference "
                            f"(relative error {err:.3g} > {limit:g})"
                        )
            finally:
                mod.activation_mode = saved
    forward = _forward(model, info, device)
    if not forward["finite"]:
        failures.append("the forward pass produced non-finite logits")
    return {
        "path": str(info.path),
        "format": info.format,
        "format_name": info.format_name,
        "scheme": info.scheme,
        "device": device,
        "dtype": str(mdtype).removeprefix("torch."),
        "load_seconds": load_s,
        "quantized": len(info.quantized),
        "fp8": len(info.fp8),
        "packed": len(names) - len(not_packed),
        "sampled": len(picked),
        "layer_types": worst,
        "forward": forward,
        "failures": failures,
        "passed": not failures,
    }


def _forward(model: Any, info: CheckpointInfo, device: str) -> dict[str, Any]:
    import torch

    from ..tools import runtime

    tok = runtime.tokenizer(info.path)
    if tok is not None:
        ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    else:
        vocab = int(getattr(model.config, "vocab_size", None) or model.config.get_text_config().vocab_size)
        ids = torch.randint(0, vocab, (1, 8), generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    with torch.no_grad():
        logits = model(input_ids=ids.to(device)).logits
    runtime.sync(device)
    return {
        "shape": list(logits.shape),
        "finite": bool(torch.isfinite(logits).all()),
        "seconds": time.perf_counter() - start,
    }


def render(r: dict[str, Any]) -> str:
    ok = "OK" if r["packed"] == r["quantized"] else "FAILED"
    lines = [
        f"verify {r['path']} ({r['format']}, {r['scheme']}) on {r['device']}, {r['dtype']}, loaded in "
        f"{r['load_seconds']:.1f} s",
        f"  packed    {r['packed']}/{r['quantized']} "
        + (
            f"layers kept their format ({r['quantized'] - r['fp8']} NVFP4: uint8 codes + e4m3 scales; "
            f"{r['fp8']} FP8: e4m3 weights): {ok}"
            if r["fp8"]
            else f"NVFP4 layers stayed packed (uint8 codes, e4m3 scales): {ok}"
        ),
        f"  compared  {r['sampled']} layers with a float64 dequantization of the checkpoint "
        "(4 random inputs each)",
        f"  {'layer type':<36} {'layers':>6}  {'worst rel. error':>16}  {'tolerance':>9}",
    ]
    for kind, e in sorted(r["layer_types"].items()):
        status = "OK" if e["error"] <= e["tolerance"] else "FAILED"
        lines.append(f"  {kind:<36} {e['layers']:>6}  {e['error']:>16.2e}  {e['tolerance']:>9.0e}  {status}")
    f = r["forward"]
    lines.append(
        f"  forward   logits {f['shape']} {'finite' if f['finite'] else 'NOT finite'} "
        f"in {f['seconds']:.2f} s: {'OK' if f['finite'] else 'FAILED'}"
    )
    lines += [f"  failure: {x}" for x in r["failures"]]
    lines.append("PASS" if r["passed"] else "FAIL")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    result = verify(str(Path(args.path)), args.device, args.dtype, args.all, args.seed)
    print(render(result))
    return 0 if result["passed"] else 1
