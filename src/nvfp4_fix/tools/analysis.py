"""What ``inspect`` reports, from configs and safetensors headers alone (no torch import, no tensor data)."""

from __future__ import annotations

import importlib.metadata
import re
from collections import Counter
from typing import Any

from ..checkpoint import COMPRESSED_TENSORS, MODELOPT, CheckpointInfo, TensorInfo, layer_pattern
from ..errors import CheckpointError

FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}
SCALE_SUFFIXES = {
    COMPRESSED_TENSORS: (".weight_global_scale", ".input_global_scale"),
    MODELOPT: (".weight_scale_2", ".input_scale"),
}
FORMAT_NAMES = {
    COMPRESSED_TENSORS: "compressed-tensors",
    MODELOPT: "NVIDIA ModelOpt (hf_quant_config.json)",
}
_DECODER = re.compile(
    r"^(?:model\.|model\.language_model\.|language_model\.model\.)layers\.\d+\."
    r"(?:self_attn|mlp)\.(?P<leaf>[qkvo]_proj|gate_proj|up_proj|down_proj)$"
)
FUSED = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gate_up", "up_proj": "gate_up"}


def module_of(name: str) -> str:
    return name.rpartition(".")[0]


def text_config(config: dict[str, Any]) -> dict[str, Any]:
    tc = config.get("text_config")
    return tc if isinstance(tc, dict) and "hidden_size" in tc else config


def modelopt_section(info: CheckpointInfo) -> dict[str, Any]:
    """hf_quant_config.json's "quantization" object (or a config.json modelopt quantization_config)."""
    q = info.quant_config.get("quantization")
    return q if isinstance(q, dict) else info.quant_config


def quant_algo(info: CheckpointInfo) -> str | None:
    algo = modelopt_section(info).get("quant_algo")
    return str(algo) if algo is not None else None


def architecture(config: dict[str, Any]) -> str | None:
    """config.json's first architecture, or None (whatever JSON the file holds)."""
    archs = config.get("architectures")
    return archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else None


def _expected_shapes(config: dict[str, Any]) -> dict[str, tuple[int, int, str]]:
    """(out, in) per decoder projection, from a Llama-like config; {} when the keys are missing."""
    c = text_config(config)
    try:
        hidden, heads, inter = (
            int(c["hidden_size"]),
            int(c["num_attention_heads"]),
            int(c["intermediate_size"]),
        )
        kv = int(c.get("num_key_value_heads") or heads)
        head_dim = int(c.get("head_dim") or hidden // heads)
    except (KeyError, TypeError, ValueError, ZeroDivisionError, OverflowError):
        return {}
    h = f"hidden_size={hidden}"
    a = f"num_attention_heads={heads} x head_dim={head_dim}"
    k = f"num_key_value_heads={kv} x head_dim={head_dim}"
    i = f"intermediate_size={inter}"
    return {
        "q_proj": (heads * head_dim, hidden, f"{a}, {h}"),
        "k_proj": (kv * head_dim, hidden, f"{k}, {h}"),
        "v_proj": (kv * head_dim, hidden, f"{k}, {h}"),
        "o_proj": (hidden, heads * head_dim, f"{h}, {a}"),
        "gate_proj": (inter, hidden, f"{i}, {h}"),
        "up_proj": (inter, hidden, f"{i}, {h}"),
        "down_proj": (hidden, inter, f"{h}, {i}"),
    }


def header_problems(info: CheckpointInfo) -> list[str]:
    """Everything wrong that headers and config.json can show (one line each, naming the file).

    ``inspect_checkpoint`` already refuses packed weights without e4m3 block scales of the right shape
    or without a per-tensor scale; this adds scale shapes, AWQ vectors and the config's layer sizes.
    """
    if info.format is None:
        return []
    problems: list[str] = []
    expected = _expected_shapes(info.config)
    cfg = info.path / "config.json"
    for prefix, q in info.quantized.items():
        packed = info.tensors[weight_name(info, prefix)]
        lead = () if q.experts is None else (q.experts,)
        for suffix in SCALE_SUFFIXES[info.format] if q.scheme == "nvfp4" else ():
            t = info.tensors.get(prefix + suffix)
            if t is None:
                continue
            if t.dtype != "F32":
                problems.append(f"{t.file}: tensor {t.name!r} is {t.dtype}; expected F32")
            if t.numel != max(1, _prod(lead)) or len(t.shape) > 1 + len(lead):
                problems.append(
                    f"{t.file}: tensor {t.name!r} has shape {list(t.shape)}; expected one value "
                    f"per tensor ([] or [1])"
                )
        pqs = info.tensors.get(prefix + ".pre_quant_scale")
        if pqs is not None and (pqs.shape[-1:] != (q.in_features,) or pqs.dtype not in FLOAT_DTYPES):
            problems.append(
                f"{pqs.file}: tensor {pqs.name!r} is {pqs.dtype}{list(pqs.shape)}; expected a "
                f"float vector [{q.in_features}] (in_features)"
            )
        m = _DECODER.match(prefix)
        if m and m["leaf"] in expected and q.experts is None:
            n, k, why = expected[m["leaf"]]
            if (q.out_features, q.in_features) != (n, k):
                problems.append(
                    f"{packed.file}: tensor {packed.name!r} {list(packed.shape)} holds a {q.out_features}x"
                    f"{q.in_features} layer; {cfg} expects {n}x{k} ({why})"
                )
    c = text_config(info.config)
    for name, t in info.tensors.items():
        if name.endswith("embed_tokens.weight") and name.startswith(("model.", "model.language_model.")):
            want = (c.get("vocab_size"), c.get("hidden_size"))
            if None not in want and t.shape != want:
                problems.append(
                    f"{t.file}: tensor {name!r} has shape {list(t.shape)}; {cfg} expects "
                    f"{list(want)} (vocab_size, hidden_size)"
                )
    return problems


def weight_name(info: CheckpointInfo, prefix: str) -> str:
    """The tensor holding a quantized layer's codes: NVFP4 ``weight_packed`` / ``weight``, FP8 ``weight``."""
    return info.packed_name(prefix) if info.quantized[prefix].scheme == "nvfp4" else prefix + ".weight"


def require_consistent(info: CheckpointInfo) -> None:
    """Raise the first header problem as a CheckpointError (used before writing anything)."""
    problems = header_problems(info)
    if problems:
        more = f" (and {len(problems) - 1} more; run nvfp4-fix inspect)" if len(problems) > 1 else ""
        raise CheckpointError(problems[0] + more)


def _prod(xs: tuple[int, ...]) -> int:
    n = 1
    for x in xs:
        n *= x
    return n


def collapse(names: list[str]) -> list[dict[str, Any]]:
    """Group module names by layer pattern: [{'pattern': 'model.layers.*.mlp.up_proj', 'count': 80}]."""
    counts = Counter(layer_pattern(n) for n in names)
    return [{"pattern": p, "count": c} for p, c in counts.items()]


def memory(info: CheckpointInfo) -> dict[str, int]:
    """Bytes: on disk, resident with packed layers (bf16 elsewhere), and fully bf16."""
    files = {t.file for t in info.tensors.values()}
    # a hub checkpoint described from its headers has no local files: count the tensors' bytes
    disk = sum(f.stat().st_size if f.is_file() else 0 for f in files)
    disk += sum(t.nbytes for t in info.tensors.values() if not t.file.is_file())
    packed = bf16 = 0
    for name, t in info.tensors.items():
        q = info.quantized.get(module_of(name))
        if q is not None:
            packed += t.nbytes
            if name == weight_name(info, q.prefix):  # bf16: 2 bytes per weight (two per U8 byte of codes)
                bf16 += 2 * t.numel * (2 if t.dtype == "U8" else 1)
            continue
        size = 2 * t.numel if t.dtype in FLOAT_DTYPES else t.nbytes
        packed += size
        bf16 += size
    return {"disk": disk, "packed": packed, "bf16": bf16}


_EXPERT = re.compile(r"\.experts\.\d+\.")


def has_experts(info: CheckpointInfo) -> bool:
    """Mixture-of-experts checkpoints: one NVFP4 linear per expert, or stacked [E, N, K/2] experts."""
    return any(q.experts is not None or _EXPERT.search(p) for p, q in info.quantized.items())


def runtimes(info: CheckpointInfo, mem: dict[str, int]) -> list[dict[str, Any]]:
    """Which runtimes load this checkpoint ("yes", "no", or "patch": only with nvfp4-fix's patch) and why."""
    w4a4 = info.scheme is not None and info.scheme.startswith("W4A4")
    awq = info.scheme is not None and info.scheme.endswith("AWQ")
    out: list[dict[str, Any]] = [
        {
            "runtime": "nvfp4-fix (this package)",
            "loads": "yes",
            "note": f"layers stay packed ({human(mem['packed'])} resident)"
            + ("; W4A4 activations fake-quantized as compressed-tensors does" if w4a4 else "")
            + ("; AWQ pre_quant_scale applied" if awq else "")
            + (
                "; FP8 layers kept in 8 bits (W8A16; their FP8 activation quantization reproduced)"
                if info.fp8
                else ""
            ),
        }
    ]
    if info.format == COMPRESSED_TENSORS:
        out.append(
            {
                "runtime": "compressed-tensors 0.13.x + transformers",
                "loads": "patch",
                "note": "needs nvfp4-fix's patch (apply_patch()): unpatched, the first forward raises "
                "KeyError: 'weight_scale', and run_compressed=False fails with a Float8 promotion error",
            }
        )
        moe = has_experts(info)
        out.append(
            {
                "runtime": "compressed-tensors >= 0.14 + transformers",
                "loads": "no" if moe else "yes",
                "note": (
                    "loads and runs, but transformers dequantizes NVFP4 MoE experts without their "
                    "weight_global_scale (transformers#48371; measured with 5.24 + compressed-tensors 0.20): "
                    "wrong outputs, silently; "
                    if moe
                    else ""
                )
                + f"decompresses the whole model to bf16 on the first forward "
                f"(~{human(mem['bf16'])} instead of {human(mem['packed'])})"
                + ("; dequantize=True drops the W4A4 activation quantization" if w4a4 else ""),
            }
        )
    else:
        out.append(
            {
                "runtime": "compressed-tensors / plain transformers",
                "loads": "no",
                "note": "transformers has no ModelOpt quantizer ('Unknown quantization type, got modelopt') "
                "and compressed-tensors reads only its own layout; "
                + (
                    "the AWQ pre_quant_scale has no compressed-tensors equivalent"
                    if awq
                    else "`nvfp4-fix convert --to compressed-tensors` rewrites it for them"
                ),
            }
        )
    marlin = "weight-only Marlin FP4 on compute capability >= 7.5" + (
        " (activations stay bf16)" if w4a4 else ""
    )
    out.append(
        {
            "runtime": "vLLM",
            "loads": "yes",
            "note": f"native FP4 GEMMs (CUTLASS/FlashInfer) on Blackwell; {marlin}",
        }
    )
    return out


def installed_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for dist in ("nvfp4-fix", "compressed-tensors", "transformers", "vllm"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def report(info: CheckpointInfo) -> dict[str, Any]:
    """The whole header-level report as a JSON-serialisable dict."""
    if info.format is None:
        qm = info.quant_config.get("quant_method") or info.quant_config.get("quant_algo")
        raise CheckpointError(
            f"{info.path}: not an NVFP4 checkpoint ("
            + (f"quantization {qm!r}" if qm else "no quantization_config and no hf_quant_config.json")
            + "); expected compressed-tensors 'nvfp4-pack-quantized' or ModelOpt quant_algo NVFP4"
        )
    quantized: dict[str, dict[str, Any]] = {}
    for prefix, q in info.quantized.items():
        pat = layer_pattern(prefix)
        entry = quantized.setdefault(
            pat,
            {
                "pattern": pat,
                "kind": q.describe(),
                "count": 0,
                "shapes": [],
                "experts": q.experts,
                "input_scale": q.has_input_scale,
                "pre_quant_scale": False,
            },
        )
        entry["count"] += 1
        shape = f"{q.out_features}x{q.in_features}"
        if shape not in entry["shapes"]:
            entry["shapes"].append(shape)
        entry["pre_quant_scale"] |= q.has_pre_quant_scale
    unquantized = [
        module_of(n)
        for n, t in info.tensors.items()
        if n.endswith(".weight") and len(t.shape) == 2 and module_of(n) not in info.quantized
    ]
    mem = memory(info)
    files = sorted({t.file for t in info.tensors.values()})
    c = text_config(info.config)
    return {
        "path": str(info.path),
        "producer": info.producer,
        "producer_version": info.producer_version,
        "format": info.format,
        "format_name": f"{FORMAT_NAMES[info.format]} {info.format_name}"
        if info.format == COMPRESSED_TENSORS and info.format_name
        else FORMAT_NAMES[info.format],
        "quant_algo": quant_algo(info) if info.format == MODELOPT else None,
        "scheme": info.scheme,
        "architecture": architecture(info.config),
        "model_type": info.config.get("model_type")
        if isinstance(info.config.get("model_type"), str)
        else None,
        "layers": c.get("num_hidden_layers"),
        "hidden_size": c.get("hidden_size"),
        "quantized": list(quantized.values()),
        "quantized_count": len(info.quantized),
        "kinds": dict(Counter(q.describe() for q in info.quantized.values())),
        "moe": has_experts(info),
        "excluded": info.excluded,
        "unquantized": collapse(unquantized),
        "tensors": {
            "count": len(info.tensors),
            "files": [f.name for f in files],
            "dtypes": dict(Counter(t.dtype for t in info.tensors.values())),
        },
        "memory": mem,
        "runtimes": runtimes(info, mem),
        "installed": installed_versions(),
        "problems": header_problems(info),
    }


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def tensor_label(t: TensorInfo) -> str:
    return f"{t.name} ({t.dtype}{list(t.shape)}, {t.file.name})"
