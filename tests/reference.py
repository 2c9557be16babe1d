"""An independent NVFP4 reference: numpy float64, written from the format description alone.

It shares no code with ``nvfp4_fix``: the E2M1 table, nibble order, e4m3 decoding and both global
scale conventions are spelled out again here, so a bug in the package's codec cannot hide itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], dtype=np.float64)


def e4m3_to_float(bits: np.ndarray) -> np.ndarray:
    """Decode float8_e4m3fn bytes: 1 sign, 4 exponent (bias 7), 3 mantissa bits; 0x7f/0xff are NaN."""
    bits = bits.astype(np.int64)
    sign = np.where(bits & 0x80, -1.0, 1.0)
    exp = (bits >> 3) & 0xF
    man = bits & 0x7
    normal = sign * (1 + man / 8.0) * np.exp2(exp - 7.0)
    subnormal = sign * (man / 8.0) * np.exp2(-6.0)
    out = np.where(exp == 0, subnormal, normal)
    return np.where((bits & 0x7F) == 0x7F, np.nan, out)


def dequantize_np(
    packed: np.ndarray, scale_bits: np.ndarray, global_scale: float, convention: str
) -> np.ndarray:
    """float64 weights [N, K] from uint8 codes [N, K/2] (low nibble = even column) and e4m3 bytes."""
    codes = np.empty((packed.shape[0], packed.shape[1] * 2), dtype=np.int64)
    codes[:, 0::2] = packed & 0x0F
    codes[:, 1::2] = packed >> 4
    scales = np.repeat(e4m3_to_float(scale_bits), 16, axis=1)
    g = float(global_scale)
    factor = 1.0 / g if convention == "divisor" else g
    return E2M1[codes] * scales * factor


def dequantize_fp8_np(bits: np.ndarray, scale: np.ndarray, block: tuple[int, int]) -> np.ndarray:
    """float64 weights [N, K] from e4m3 bytes and a scale per tensor ([1] / []), per row ([N, 1] / [N])
    or per block of ``block`` rows x columns ([ceil(N/bn), ceil(K/bk)], the last blocks partial)."""
    w = e4m3_to_float(bits)
    n, k = w.shape
    s = scale.astype(np.float64)
    if s.size == 1:
        return w * s.reshape(())
    if s.size == n and (s.ndim == 1 or s.shape[1] == 1):
        return w * s.reshape(n, 1)
    bn, bk = block
    return w * np.kron(s, np.ones((bn, bk)))[:n, :k]


def _block(path: Path) -> tuple[int, int]:
    """The FP8 block shape a checkpoint's config declares (128 x 128, ModelOpt's, if none)."""
    qc = json.loads((path / "config.json").read_text()).get("quantization_config") or {}
    for group in (qc.get("config_groups") or {}).values():
        bs = (group.get("weights") or {}).get("block_structure")
        if bs:
            return int(bs[0]), int(bs[1])
    return 128, 128


def _np(t: torch.Tensor) -> np.ndarray:
    if t.dtype == torch.float8_e4m3fn:
        return t.view(torch.uint8).numpy()
    if t.dtype == torch.bfloat16:
        return t.float().numpy()
    return t.numpy()


def dense_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint with NVFP4 layers replaced by float32 dense ``weight``s."""
    path = Path(path)
    files = sorted(path.glob("*.safetensors"))
    raw: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), "pt") as fh:
            for k in fh.keys():
                raw[k] = fh.get_tensor(k)
                if raw[k].dtype == torch.float4_e2m1fn_x2:  # safetensors F4: the same packed bytes as U8
                    raw[k] = raw[k].view(torch.uint8)
    modelopt = (path / "hf_quant_config.json").exists()
    packed_suffix = ".weight" if modelopt else ".weight_packed"
    out: dict[str, torch.Tensor] = {}
    skip = set()
    for k, t in raw.items():
        if k.endswith(packed_suffix) and t.dtype == torch.uint8:
            pre = k[: -len(packed_suffix)]
            g = raw[pre + (".weight_scale_2" if modelopt else ".weight_global_scale")]
            w = dequantize_np(
                _np(t),
                _np(raw[pre + ".weight_scale"]),
                float(g.reshape(-1)[0]),
                "multiplier" if modelopt else "divisor",
            )
            out[pre + ".weight"] = torch.from_numpy(w).float()
            skip |= {
                pre + s
                for s in (
                    ".weight_scale",
                    ".weight_scale_2",
                    ".weight_global_scale",
                    ".input_global_scale",
                    ".input_scale",
                )
            }
            if pre + ".pre_quant_scale" in raw:
                out[pre + ".pre_quant_scale"] = raw[pre + ".pre_quant_scale"].float()
                skip.add(pre + ".pre_quant_scale")
    for k, t in raw.items():
        if k.endswith(".weight") and t.dtype == torch.float8_e4m3fn:
            pre = k[: -len(".weight")]
            w = dequantize_fp8_np(_np(t), _np(raw[pre + ".weight_scale"]), _block(path))
            out[k] = torch.from_numpy(w).float()
            skip |= {pre + ".weight_scale", pre + ".input_scale"}
    for k, t in raw.items():
        if k in skip or k in out or (k.endswith(packed_suffix) and t.dtype == torch.uint8):
            continue
        if k.endswith((".k_scale", ".v_scale")):
            continue
        out[k] = t.float() if t.is_floating_point() else t
    return out


def reference_model(path: str | Path, model_class=None):
    """A float32 transformers model holding the independently dequantized weights.

    The dense tensors are written to a temporary plain checkpoint and loaded by transformers itself,
    so its own key renames (e.g. LLaVA's) apply. AWQ ``pre_quant_scale`` is folded into the dense
    weight (W' = W * s along K), the same function as scaling the input first.
    """
    import tempfile

    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    model_class = model_class or AutoModelForCausalLM
    path = Path(path)
    sd = dense_state_dict(path)
    for k in [k for k in sd if k.endswith(".pre_quant_scale")]:
        pre = k[: -len(".pre_quant_scale")]
        sd[pre + ".weight"] = sd[pre + ".weight"] * sd.pop(k)[None, :]
    config = json.loads((path / "config.json").read_text())
    config.pop("quantization_config", None)
    config["torch_dtype"] = config["dtype"] = "float32"
    if "num_local_experts" in config:  # transformers 4.57 reads the expert count of Qwen3-MoE from here
        config.setdefault("num_experts", config["num_local_experts"])
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(config))
        save_file(
            {k: v.contiguous() for k, v in sd.items()},
            str(Path(tmp) / "model.safetensors"),
            metadata={"format": "pt"},
        )
        model = model_class.from_pretrained(tmp, torch_dtype=torch.float32)
    return model.eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a64, b64 = a.double(), b.double()
    assert torch.isfinite(a64).all(), "output has NaN/inf"
    return float((a64 - b64).norm() / b64.norm())


def fixture_dirs(root: Path) -> list[Path]:
    return sorted(
        p.parent
        for p in root.glob("*/*/config.json")
        if (p.parent / "model.safetensors").exists() or (p.parent / "model.safetensors.index.json").exists()
    )


def manifest(root: Path) -> dict:
    f = root / "MANIFEST.json"
    return json.loads(f.read_text()) if f.exists() else {}


def hf_greedy(model, ids: torch.Tensor, n: int, eos=None, pad: int = 0) -> torch.Tensor:
    """transformers' own greedy decoding: what the fast generation path must reproduce."""
    from transformers import GenerationConfig

    # eos None would let generate() fall back to the model's generation_config EOS ids: [] means none.
    eos = [] if eos is None else eos
    gc = GenerationConfig(
        do_sample=False, max_new_tokens=n, eos_token_id=eos, pad_token_id=pad, bos_token_id=None
    )
    with torch.no_grad():
        return model.generate(input_ids=ids.to(model.device), generation_config=gc).cpu()
