#!/usr/bin/env python
"""Make the mixed-precision test checkpoints of issue 15 under tests/fixtures/mixed/.

Reuses scripts/make_fixtures.py (model, tokenizer, calibration data, reference logits, manifest).
Run each fixture in its producer env (the command is in MANIFEST.json), e.g.

    fixture-envs/current/bin/python  scripts/make_mixed_fixtures.py --only llama-nvfp4a16-fp8block
    fixture-envs/modelopt/bin/python scripts/make_mixed_fixtures.py --only modelopt-mixed_precision

Without --only it makes every fixture whose producer is importable in the running env. After a
fixture is written, every quantized layer of the checkpoint is decoded here (float64, independent
of the producers' code) and compared with the bf16 weights of the model before quantization; the
worst relative errors per layer kind go into MANIFEST.json and a failure stops the run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import struct
import sys
import time
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_fixtures as mf  # noqa: E402

MLP = r"re:.*mlp\.(gate|up|down)_proj$"
QKV = r"re:.*self_attn\.[qkv]_proj$"
O_PROJ = r"re:.*self_attn\.o_proj$"
ATTN = r"re:.*self_attn\.(q|k|v|o)_proj$"
FP8_TOL = 0.06  # e4m3 rounding of random normal weights: ~0.02-0.03
NVFP4_TOL = 0.12  # E2M1 with e4m3 block scales: ~0.095 (tests/fixtures/README.md)
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)

# name -> (producer, arch, {preset: targets} or a ModelOpt layout label, calibrate)
CT_FIXTURES = {
    "llama-nvfp4-fp8dynamic-fp8static": ({"NVFP4": [MLP], "FP8_DYNAMIC": [QKV], "FP8": [O_PROJ]}, True),
    "llama-nvfp4a16-fp8block": ({"NVFP4A16": [MLP], "FP8_BLOCK": [ATTN]}, False),
    "llama-nvfp4a16-bf16attn": ({"NVFP4A16": [MLP]}, False),
    # gate/up have 688 rows, no multiple of 128: their last FP8 block row is partial. (FP8_BLOCK on
    # down_proj, K = 688, quantizes, but llmcompressor's own forward then fails: its dynamic
    # per-group-128 activations need K % 128 == 0.)
    "llama-nvfp4a16-fp8block-partial": (
        {"NVFP4A16": [ATTN, r"re:.*mlp\.down_proj$"], "FP8_BLOCK": [r"re:.*mlp\.(gate|up)_proj$"]},
        False,
    ),
}
ENV_OF = {
    **{k: "current" for k in CT_FIXTURES},
    "qwen3_moe-nvfp4a16-gateup": "current",
    "modelopt-mixed_precision": "modelopt",
    "llama-nvfp4a16-f4": "current",
}


# --------------------------------------------------------------------------------------------
# dense weights of the model before quantization, by checkpoint key prefix
# --------------------------------------------------------------------------------------------
def dense_weights(model) -> dict:
    """prefix ('model.layers.0.mlp.down_proj.') -> float64 weight; fused MoE experts split per expert
    and projection as the producers save them."""
    import torch

    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            out[f"{name}."] = mod.weight.detach().double().clone()
        elif hasattr(mod, "gate_up_proj") and hasattr(mod, "down_proj"):
            gate_up = mod.gate_up_proj.detach().double()
            inter = gate_up.shape[1] // 2
            for e in range(gate_up.shape[0]):
                out[f"{name}.{e}.gate_proj."] = gate_up[e, :inter].clone()
                out[f"{name}.{e}.up_proj."] = gate_up[e, inter:].clone()
                out[f"{name}.{e}.down_proj."] = mod.down_proj.detach()[e].double().clone()
    return out


# --------------------------------------------------------------------------------------------
# independent float64 decoding of the checkpoint
# --------------------------------------------------------------------------------------------
def decode_nvfp4(packed, scale, global_scale, divide: bool):
    """packed uint8 [N, K/2] (low nibble first), e4m3 scale [N, K/16]; ct divides by the global
    scale, ModelOpt multiplies by weight_scale_2."""
    import torch

    lut = torch.tensor(E2M1 + tuple(-v for v in E2M1), dtype=torch.float64)
    p = packed.view(torch.uint8).long()
    codes = torch.stack([p & 0xF, p >> 4], dim=-1).reshape(p.shape[0], -1)
    g = global_scale.double().reshape(())
    s = scale.double() / g if divide else scale.double() * g
    return lut[codes] * s.repeat_interleave(16, dim=1)[:, : codes.shape[1]]


def decode_fp8(weight, scale, block: int = 128):
    """e4m3 weight [N, K] times a per-tensor, per-channel [N, 1] or 128x128-block
    [ceil(N/128), ceil(K/128)] scale; a partial last block keeps its block's scale."""
    w, s = weight.double(), scale.double()
    if s.dim() == 2 and s.shape != (w.shape[0], 1):
        blocks = (-(-w.shape[0] // block), -(-w.shape[1] // block))
        assert tuple(s.shape) == blocks, (tuple(w.shape), tuple(s.shape))
        s = s.repeat_interleave(block, 0).repeat_interleave(block, 1)[: w.shape[0], : w.shape[1]]
    return w * s


def describe(sf, prefix) -> tuple[str, object]:
    """(kind, float64 dequantized weight) of the layer at `prefix`, or None if it is not quantized."""
    keys = set(sf.keys())
    dt = {k[len(prefix) :]: sf.get_slice(k).get_dtype() for k in keys if k.startswith(prefix)}
    get = sf.get_tensor
    if "weight_packed" in dt:
        w = decode_nvfp4(
            get(prefix + "weight_packed"),
            get(prefix + "weight_scale"),
            get(prefix + "weight_global_scale"),
            True,
        )
        return ("NVFP4 W4A4" if "input_global_scale" in dt else "NVFP4 W4A16"), w
    if dt.get("weight") == "U8":
        w = decode_nvfp4(
            get(prefix + "weight"), get(prefix + "weight_scale"), get(prefix + "weight_scale_2"), False
        )
        return ("NVFP4 W4A4" if "input_scale" in dt else "NVFP4 W4A16"), w
    if dt.get("weight") == "F8_E4M3":
        scale = get(prefix + "weight_scale")
        w = decode_fp8(get(prefix + "weight"), scale)
        layout = "tensor" if scale.numel() == 1 else "channel" if scale.shape[-1] == 1 else "block"
        return f"FP8 per-{layout} " + ("static act" if "input_scale" in dt else "dynamic act"), w
    return None


def verify(outdir: Path, dense: dict) -> dict:
    """Print the quantization config and tensor dtypes per layer; decode every quantized layer and
    compare with the dense weight. Raises if a tolerance is missed. Returns the worst error per kind."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file

    cfg = json.loads((outdir / "config.json").read_text()).get("quantization_config", {})
    for g, spec in (cfg.get("config_groups") or {}).items():
        w = spec.get("weights") or {}
        a = spec.get("input_activations") or {}
        wdesc = f"{w.get('type')}{w.get('num_bits')}/{w.get('strategy')}{w.get('block_structure') or ''}"
        adesc = a and (a.get("strategy"), a.get("dynamic"))
        print(
            f"  {g}: targets={spec.get('targets')} format={spec.get('format')} weights={wdesc} acts={adesc}"
        )
    print(f"  ignore={cfg.get('ignore')} format={cfg.get('format')} quant_algo={cfg.get('quant_algo')}")
    hq = outdir / "hf_quant_config.json"
    if hq.exists():
        q = json.loads(hq.read_text())["quantization"]
        layers = json.dumps(q.get("quantized_layers"))
        print(f"  hf_quant_config: quant_algo={q.get('quant_algo')} quantized_layers={layers}")
    worst: dict = {}
    with safe_open(str(outdir / "model.safetensors"), "pt") as sf:
        prefixes = sorted({k.rsplit(".", 1)[0] + "." for k in sf.keys() if ".layers." in k})
        for p in prefixes:
            dts = ", ".join(
                f"{k[len(p) :]}:{sf.get_slice(k).get_dtype()}{sf.get_slice(k).get_shape()}"
                for k in sorted(sf.keys())
                if k.startswith(p) and "." not in k[len(p) :]
            )
            got = describe(sf, p)
            if got is None:
                if p in dense:  # a linear left unquantized must hold the dense weight exactly
                    same = torch.equal(sf.get_tensor(p + "weight").double(), dense[p])
                    worst["bf16 (unchanged)"] = max(worst.get("bf16 (unchanged)", 0.0), float(not same))
                if "layers.0." in p:
                    print(f"  {p:<44} {dts}")
                continue
            kind, w = got
            ref = dense.get(p)
            if ref is None or ref.shape != w.shape:
                raise SystemExit(
                    f"{outdir}: {p} has no dense weight of shape {tuple(w.shape)} to compare with"
                )
            err = ((w - ref).norm() / ref.norm()).item()
            worst[kind] = max(worst.get(kind, 0.0), err)
            if "layers.0." in p and (".experts." not in p or ".experts.0." in p or ".experts.1." in p):
                print(f"  {p:<44} {kind:<30} rel.err {err:.4f}  {dts}")
    for kind, err in sorted(worst.items()):
        tol = FP8_TOL if kind.startswith("FP8") else NVFP4_TOL if kind.startswith("NVFP4") else 0.0
        print(f"  worst {kind:<30} {err:.4f} (tolerance {tol})")
        if err > tol:
            raise SystemExit(f"{outdir}: {kind} layers decode to rel. error {err:.4f} > {tol}")
    out = {k: round(v, 4) for k, v in sorted(worst.items())}
    ref = load_file(str(outdir / "reference" / "outputs.safetensors"))
    dense_logits, quant = ref["logits_dense"].double(), ref["logits_producer"].double()
    out["logits_producer_vs_dense"] = round(((quant - dense_logits).norm() / dense_logits.norm()).item(), 4)
    print(f"  reference logits: producer's fake-quant vs dense rel. error {out['logits_producer_vs_dense']}")
    return out


# --------------------------------------------------------------------------------------------
# recipes
# --------------------------------------------------------------------------------------------
def make_ct(name: str, outdir: Path) -> dict:
    scheme, calibrate = CT_FIXTURES[name]
    model = mf.make_model("llama")
    dense = dense_weights(model)
    mf.run_llmcompressor(
        name, "llama", scheme, ["lm_head"], outdir, "current", model=model, calibrate=calibrate
    )
    return dict(
        producer="llmcompressor",
        arch="llama",
        scheme=scheme,
        ignore=["lm_head"],
        checks=verify(outdir, dense),
    )


@contextmanager
def gate_up_scales_unfused():
    """llmcompressor 0.14 links the gate and up observers of every module that has both (so they
    share one global scale: observers/helpers.py FUSED_LAYER_NAMES). Released MoE checkpoints made
    without that link carry different ones; drop the pair for this run only."""
    from llmcompressor.observers import helpers

    pair = ("gate_proj", "up_proj")
    helpers.FUSED_LAYER_NAMES.remove(pair)
    try:
        yield
    finally:
        helpers.FUSED_LAYER_NAMES.insert(0, pair)


def make_moe_gateup(name: str, outdir: Path) -> dict:
    import torch
    from safetensors import safe_open

    model = mf.make_model("qwen3_moe")
    with torch.no_grad():  # even experts: gate x4; odd experts: up x4
        for mod in model.modules():
            if hasattr(mod, "gate_up_proj"):
                inter = mod.gate_up_proj.shape[1] // 2
                mod.gate_up_proj[0::2, :inter] *= 4
                mod.gate_up_proj[1::2, inter:] *= 4
    dense = dense_weights(model)
    ignore = ["lm_head", "re:.*mlp.gate$"]
    with gate_up_scales_unfused():
        mf.run_llmcompressor(name, "qwen3_moe", "NVFP4A16", ignore, outdir, "current", model=model)
    checks = verify(outdir, dense)
    ratios = []
    with safe_open(str(outdir / "model.safetensors"), "pt") as sf:
        for k in sorted(sf.keys()):
            if ".experts." in k and k.endswith("gate_proj.weight_global_scale"):
                g, u = sf.get_tensor(k).item(), sf.get_tensor(k.replace("gate_proj", "up_proj")).item()
                ratios.append(round(g / u, 3))
    print(f"  gate/up weight_global_scale ratio per expert: {ratios}")
    if any(abs(r - 1) < 1e-3 for r in ratios):
        raise SystemExit(f"{outdir}: some experts' gate and up global scales are equal: {ratios}")
    checks["gate_over_up_global_scale"] = ratios
    note = "even experts: gate half of gate_up_proj x4; odd experts: up half x4; gate/up observers not linked"
    return dict(
        producer="llmcompressor",
        arch="qwen3_moe",
        scheme="NVFP4A16",
        ignore=ignore,
        prepared=note,
        checks=checks,
    )


def modelopt_mixed_cfg():
    """FP8 (per-tensor weight, static per-tensor input) everywhere, NVFP4 W4A4 on the MLP, in
    ModelOpt's per-pattern quant_cfg list (later entries win)."""
    import copy

    import modelopt.torch.quantization as mtq

    cfg = copy.deepcopy(mtq.FP8_DEFAULT_CFG)
    nvfp4 = {e["quantizer_name"]: e["cfg"] for e in mtq.NVFP4_DEFAULT_CFG["quant_cfg"] if "cfg" in e}
    mlp = [
        {"quantizer_name": f"*mlp*{q}", "cfg": copy.deepcopy(nvfp4[f"*{q}"])}
        for q in ("weight_quantizer", "input_quantizer")
    ]
    cfg["quant_cfg"][3:3] = mlp  # after FP8's own weight/input entries, before the exclusions
    return cfg


def make_modelopt(name: str, outdir: Path) -> dict:
    model = mf.make_model("llama")
    dense = dense_weights(model)
    mf.run_modelopt(
        name, "llama", "FP8 + NVFP4 on *mlp*", outdir, "modelopt", model=model, cfg=modelopt_mixed_cfg()
    )
    return dict(
        producer="nvidia-modelopt",
        arch="llama",
        scheme="FP8_DEFAULT_CFG + NVFP4_DEFAULT_CFG on *mlp*",
        checks=verify(outdir, dense),
    )


# --------------------------------------------------------------------------------------------
# F4: the U8 packed weights of current/llama-nvfp4a16 relabelled, bytes untouched
# --------------------------------------------------------------------------------------------
def read_header(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def write_header(path: Path, header: dict, data: bytes) -> None:
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)  # safetensors pads the header to 8 bytes with spaces
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)


def make_f4(name: str, outdir: Path) -> dict:
    import torch
    from safetensors import safe_open

    src = outdir.parent.parent / "current" / "llama-nvfp4a16"
    if outdir.exists():
        shutil.rmtree(outdir)
    shutil.copytree(src, outdir)
    header, data = read_header(src / "model.safetensors")
    n = 0
    for k, v in header.items():
        if k.endswith(".weight_packed") and v["dtype"] == "U8":
            v["dtype"], v["shape"] = "F4", [v["shape"][0], 2 * v["shape"][1]]
            n += 1
    write_header(outdir / "model.safetensors", header, data)
    with (
        safe_open(str(src / "model.safetensors"), "pt") as a,
        safe_open(str(outdir / "model.safetensors"), "pt") as b,
    ):
        assert sorted(a.keys()) == sorted(b.keys())
        for k in a.keys():
            x, y = a.get_tensor(k), b.get_tensor(k)
            if k.endswith(".weight_packed"):
                # safetensors reads F4 as torch.float4_e2m1fn_x2 [N, K/2]; its own writer gives the same entry
                assert y.dtype == torch.float4_e2m1fn_x2 and y.shape == x.shape, (k, y.dtype, y.shape)
                y = y.view(torch.uint8)
                from safetensors.torch import save

                own = save({"t": y.view(torch.float4_e2m1fn_x2)})
                (m,) = struct.unpack("<Q", own[:8])
                entry = json.loads(own[8 : 8 + m])["t"]
                assert entry["dtype"] == "F4" and entry["shape"] == b.get_slice(k).get_shape(), entry
            assert x.dtype == y.dtype and torch.equal(x.view(torch.uint8), y.view(torch.uint8)), k
    print(f"  {n} weight_packed tensors relabelled U8 [N, K/2] -> F4 [N, K]; all bytes identical to {src}")
    return dict(
        producer="scripts/make_mixed_fixtures.py (header rewrite)",
        arch="llama",
        scheme="NVFP4A16",
        ignore=["lm_head"],
        source="current/llama-nvfp4a16",
        checks={"weight_packed_relabelled_F4": n, "bytes_identical": True},
    )


MAKERS = {
    **{k: make_ct for k in CT_FIXTURES},
    "qwen3_moe-nvfp4a16-gateup": make_moe_gateup,
    "modelopt-mixed_precision": make_modelopt,
    "llama-nvfp4a16-f4": make_f4,
}


def env_name() -> str:
    import importlib.util

    return "modelopt" if importlib.util.find_spec("modelopt") else "current"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tests/fixtures")
    ap.add_argument("--only", default="", help="comma-separated fixture names")
    args = ap.parse_args()
    root, env = Path(args.out), env_name()
    only = [s for s in args.only.split(",") if s] or [k for k in MAKERS if ENV_OF[k] == env]
    vers = mf.versions()
    for name in only:
        if ENV_OF[name] != env:
            raise SystemExit(f"{name} is made in fixture-envs/{ENV_OF[name]}, this is fixture-envs/{env}")
        outdir = root / "mixed" / name
        print(f"=== mixed/{name} ===", flush=True)
        t0 = time.time()
        entry = MAKERS[name](name, outdir)
        entry.update(
            era="mixed",
            seed=mf.SEED,
            path=f"mixed/{name}",
            versions=vers,
            env=f"fixture-envs/{env}",
            command=f"fixture-envs/{env}/bin/python scripts/make_mixed_fixtures.py"
            f" --out {args.out} --only {name}",
            model=mf.arch_details(entry["arch"]),
        )
        mf.update_manifest(root, {f"mixed/{name}": entry})
        size = sum(f.stat().st_size for f in outdir.rglob("*") if f.is_file())
        print(f"--- ok mixed/{name} in {time.time() - t0:.1f} s, {size / 1e6:.2f} MB", flush=True)


if __name__ == "__main__":
    main()
