#!/usr/bin/env python
"""Make the tiny NVFP4 test checkpoints with the real producers (no GPU, no hub).

Run inside one producer env (see scripts/make_fixture_envs.sh), e.g.

    fixture-envs/legacy/bin/python   scripts/make_fixtures.py --era legacy   --out tests/fixtures
    fixture-envs/current/bin/python  scripts/make_fixtures.py --era current  --out tests/fixtures
    fixture-envs/modelopt/bin/python scripts/make_fixtures.py --era modelopt --out tests/fixtures

Optional: `--only llama-nvfp4a16,llama-nvfp4` picks fixtures by directory name.
Afterwards (any env with torch + safetensors):

    python scripts/make_fixtures.py --summarize --out tests/fixtures

writes the key/dtype/shape table into tests/fixtures/README.md (between the AUTOGEN markers).
Every fixture made is recorded in tests/fixtures/MANIFEST.json (merged, keyed by directory).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

# llmcompressor 0.9 / compressed-tensors 0.13 under torch >= 2.10: torch.compile of
# pack_fp4_to_uint8 fails with a fake-tensor error; the facts doc says to disable dynamo.
if "--era" in sys.argv and "legacy" in sys.argv:
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ERAS = ("legacy", "current", "modelopt")
SEED = 1234
HIDDEN = 256
INTER = 688  # not a power of two, multiple of 16
LAYERS = 2
VOCAB = 512
HEADS = 4
KV_HEADS = 2
HEAD_DIM = 64
N_CALIB = 16
CALIB_LEN = 64

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
PAD_ID, BOS_ID, EOS_ID, UNK_ID, IMAGE_ID = range(5)

CORPUS = """\
NVFP4 stores two four-bit E2M1 codes in every byte, with one float8 scale for each block of
sixteen values and one float32 scale for the whole tensor. The quick brown fox jumps over the lazy
dog. Pack my box with five dozen liquor jugs. Sphinx of black quartz, judge my vow! 0123456789
def forward(self, hidden_states): return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
Large language models are made of linear layers: query, key, value and output projections, then a
gated feed-forward block. Quantized checkpoints must load packed, or they no longer fit the card.
"""


# --------------------------------------------------------------------------------------------
# tokenizer
# --------------------------------------------------------------------------------------------
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>{% else %}"
    "{{ c['text'] }}{% endif %}{% endfor %}{% endif %}\n{% endfor %}"
)


def build_raw_tokenizer(vocab_size: int = VOCAB):
    """A deterministic byte-level BPE `tokenizers.Tokenizer` trained on CORPUS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([CORPUS] * 20, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)]
    )
    assert tok.token_to_id("<s>") == BOS_ID and tok.token_to_id("<image>") == IMAGE_ID
    assert tok.get_vocab_size() == vocab_size, tok.get_vocab_size()
    return tok


def build_tokenizer(chat_template: bool = False):
    """The same tokenizer as a transformers PreTrainedTokenizerFast (for llmcompressor / processors)."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=build_raw_tokenizer(),
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=2048,
    )
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def save_tokenizer(outdir: Path, chat_template: bool = False):
    """Write tokenizer.json + tokenizer_config.json + special_tokens_map.json by hand.

    transformers 5 writes `"tokenizer_class": "TokenizersBackend"`, which transformers 4.x cannot
    load; this hand-written form (PreTrainedTokenizerFast) loads offline with AutoTokenizer in both.
    """
    outdir.mkdir(parents=True, exist_ok=True)
    build_raw_tokenizer().save(str(outdir / "tokenizer.json"))
    added = {
        str(i): dict(content=t, lstrip=False, normalized=False, rstrip=False, single_word=False, special=True)
        for i, t in enumerate(SPECIALS)
    }
    specials = dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>")
    cfg = dict(
        added_tokens_decoder=added,
        **specials,
        clean_up_tokenization_spaces=False,
        model_max_length=2048,
        tokenizer_class="PreTrainedTokenizerFast",
    )
    if chat_template:
        cfg["chat_template"] = CHAT_TEMPLATE
    (outdir / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (outdir / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")


REF_IDS_SHAPE = (1, 16)


def ref_input_ids():
    import torch

    g = torch.Generator().manual_seed(SEED + 2)
    ids = torch.randint(len(SPECIALS), VOCAB, REF_IDS_SHAPE, generator=g)
    ids[:, 0] = BOS_ID
    return ids


def ref_logits(model):
    import torch

    with torch.no_grad():
        return model(input_ids=ref_input_ids()).logits.float().contiguous()


def save_reference(outdir: Path, dense, producer, note: str):
    """reference/outputs.safetensors: logits of the bf16 model before quantization and of the
    producer's own quantized (fake-quant) model, for the same input_ids.  Kept in a subfolder so
    that globbing <dir>/*.safetensors finds only the checkpoint."""
    from safetensors.torch import save_file

    d = outdir / "reference"
    d.mkdir(parents=True, exist_ok=True)
    save_file(
        {"input_ids": ref_input_ids().contiguous(), "logits_dense": dense, "logits_producer": producer},
        str(d / "outputs.safetensors"),
        metadata={"note": note},
    )


def token_ids_for_config():
    return dict(pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID)


# --------------------------------------------------------------------------------------------
# configs
# --------------------------------------------------------------------------------------------
def text_config(arch: str):
    import transformers as tf

    common = dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTER,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        max_position_embeddings=512,
        **token_ids_for_config(),
    )
    if arch == "llama":
        return tf.LlamaConfig(**common, tie_word_embeddings=False), tf.LlamaForCausalLM
    if arch == "mistral":
        cfg = tf.MistralConfig(**common, sliding_window=None, tie_word_embeddings=False)
        return cfg, tf.MistralForCausalLM
    if arch == "gemma":  # Gemma 2 (text only); tied embeddings as in the real models
        return (
            tf.Gemma2Config(**common, query_pre_attn_scalar=HEAD_DIM, sliding_window=128),
            tf.Gemma2ForCausalLM,
        )
    if arch == "qwen3":
        return tf.Qwen3Config(**common, tie_word_embeddings=False), tf.Qwen3ForCausalLM
    if arch == "qwen3_moe":
        common = dict(common, intermediate_size=INTER)
        return (
            tf.Qwen3MoeConfig(
                **common,
                moe_intermediate_size=128,
                num_experts=4,
                num_experts_per_tok=2,
                decoder_sparse_step=1,
                mlp_only_layers=[],
                norm_topk_prob=True,
                tie_word_embeddings=False,
            ),
            tf.Qwen3MoeForCausalLM,
        )
    raise ValueError(arch)


def llava_config():
    import transformers as tf

    vision = tf.CLIPVisionConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        projection_dim=128,
    )
    text, _ = text_config("llama")
    cfg = tf.LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=IMAGE_ID,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        image_seq_length=16,
    )
    # some versions call it image_token_id
    if hasattr(cfg, "image_token_id"):
        cfg.image_token_id = IMAGE_ID
    for k, v in token_ids_for_config().items():
        setattr(cfg, k, v)
    return cfg, tf.LlavaForConditionalGeneration


def make_model(arch: str):
    import torch

    torch.manual_seed(SEED)
    if arch == "llava":
        cfg, cls = llava_config()
        cfg.architectures = ["LlavaForConditionalGeneration"]
    else:
        cfg, cls = text_config(arch)
        cfg.architectures = [cls.__name__]
    if "dtype" in cfg.to_dict():  # transformers >= 4.56 renamed torch_dtype -> dtype
        cfg.dtype = torch.bfloat16
    else:
        cfg.torch_dtype = torch.bfloat16
    model = cls(cfg).to(torch.bfloat16)
    model.eval()
    return model


def make_processor(tok):
    from transformers import CLIPImageProcessor, LlavaProcessor

    ip = CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, do_center_crop=True
    )
    kwargs = dict(patch_size=8, vision_feature_select_strategy="default", image_token="<image>")
    kwargs["num_additional_image_tokens"] = 1
    try:
        return LlavaProcessor(image_processor=ip, tokenizer=tok, chat_template=tok.chat_template, **kwargs)
    except TypeError:
        kwargs.pop("num_additional_image_tokens")
        return LlavaProcessor(image_processor=ip, tokenizer=tok, **kwargs)


def calib_ids():
    import torch

    g = torch.Generator().manual_seed(SEED + 1)
    ids = torch.randint(len(SPECIALS), VOCAB, (N_CALIB, CALIB_LEN), generator=g)
    ids[:, 0] = BOS_ID
    return ids


# --------------------------------------------------------------------------------------------
# compressed-tensors (llmcompressor) fixtures
# --------------------------------------------------------------------------------------------
def ct_fixtures(era: str):
    """name -> (arch, scheme, ignore)."""
    ign = ["lm_head"]
    moe_ign = ["lm_head", "re:.*mlp.gate$"]
    vis_ign = ["lm_head", "re:.*vision_tower.*", "re:.*multi_modal_projector.*"]
    out = {}
    archs = ["llama", "mistral", "gemma"] + (["qwen3"] if era == "current" else [])
    for a in archs:
        for s in ("NVFP4A16", "NVFP4"):
            out[f"{a}-{s.lower()}"] = (a, s, ign)
    if era == "current":
        for s in ("NVFP4A16", "NVFP4"):
            out[f"qwen3_moe-{s.lower()}"] = ("qwen3_moe", s, moe_ign)
        for s in ("NVFP4A16", "NVFP4"):
            out[f"llava-{s.lower()}"] = ("llava", s, vis_ign)
        # vision tower quantized too (projector and lm_head kept): weight-only
        out["llava_vision-nvfp4a16"] = ("llava", "NVFP4A16", ["lm_head", "re:.*multi_modal_projector.*"])
    return out


def run_llmcompressor(name, arch, scheme, ignore, outdir: Path, era: str, model=None, calibrate=None):
    """`scheme`: a preset name, or {preset: targets} for several config groups (then `calibrate`
    says whether any group needs calibration data); `model`: a prepared bf16 model."""
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier

    model = make_model(arch) if model is None else model
    tok = build_tokenizer(chat_template=(arch == "llava"))
    recipe = QuantizationModifier(targets="Linear", scheme=scheme, ignore=ignore)
    kw = {}
    if scheme == "NVFP4" if calibrate is None else calibrate:
        ids = calib_ids()
        ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
        kw = dict(dataset=ds, num_calibration_samples=N_CALIB, max_seq_length=CALIB_LEN)
    if outdir.exists():
        shutil.rmtree(outdir)
    dense = ref_logits(model)
    with tempfile.TemporaryDirectory() as tmp:
        # llmcompressor >= 0.14 `validate_model` re-reads AutoConfig.from_pretrained(
        # model.config.name_or_path): an in-memory model (name_or_path "") fails with
        # HFValidationError. Give it a local copy of the dense checkpoint to point at.
        model.save_pretrained(tmp)
        model.config.name_or_path = tmp
        # transformers 5.17 save_pretrained turns config.dtype into the string "bfloat16" in
        # place; llmcompressor 0.14 linearize_moe then passes that string to nn.Linear(dtype=...)
        # (TypeError). Restore the torch.dtype. (load_quantizable_moe + from_pretrained, the
        # documented route, fails here: transformers' patch mapping imports every model module,
        # including image processors that need torchvision.)
        model.config.dtype = torch.bfloat16
        # (it also re-reads that config.json on save: `resave_config`, as for a real hub model)
        oneshot(model=model, recipe=recipe, tokenizer=tok, **kw)
        quant = ref_logits(model)  # llmcompressor leaves the model in fake-quant (frozen) state
        model.save_pretrained(str(outdir), save_compressed=True)
    if arch == "llava":
        make_processor(tok).save_pretrained(str(outdir))
    save_tokenizer(outdir, chat_template=(arch == "llava"))
    save_reference(
        outdir,
        dense,
        quant,
        f"llmcompressor {scheme} fake-quant forward after oneshot; input_ids seed {SEED + 2}",
    )
    # llmcompressor drops a recipe.yaml next to the weights: kept (real checkpoints ship it).


# --------------------------------------------------------------------------------------------
# ModelOpt fixtures
# --------------------------------------------------------------------------------------------
def patch_modelopt_cpu():
    """ModelOpt's dynamic block quantization asserts CUDA tensors; give it a CPU fake-quant."""
    import torch
    from modelopt.torch.quantization import tensor_quant

    E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])

    def _round_e2m1(x):
        a = x.abs().clamp(max=6.0)
        grid = E2M1.to(x.device, x.dtype)
        idx = (a.unsqueeze(-1) - grid).abs().argmin(-1)
        return grid[idx] * x.sign()

    def dynamic_block_quantize_cpu(
        inputs, block_size, amax, num_bits, exponent_bits, scale_num_bits, scale_exponent_bits
    ):
        # NVFP4 only: E2M1 values, blocks of 16, per-block fp8 e4m3 scale, per-tensor amax.
        assert (num_bits, exponent_bits, scale_num_bits, scale_exponent_bits) == (4, 2, 8, 4), (
            num_bits,
            exponent_bits,
            scale_num_bits,
            scale_exponent_bits,
        )
        shape, dtype = inputs.shape, inputs.dtype
        x = inputs.float().reshape(-1, block_size)
        if amax is None:
            amax = x.abs().amax()
        amax = amax.float().amax()
        gscale = (amax.float().to(x.device) / (6.0 * 448.0)).clamp(min=1e-12)
        bmax = x.abs().amax(-1, keepdim=True)
        bscale = (bmax / 6.0 / gscale).clamp(max=448.0).to(torch.float8_e4m3fn).float() * gscale
        bscale = torch.where(bscale == 0, torch.ones_like(bscale), bscale)
        q = _round_e2m1(x / bscale) * bscale
        return q.reshape(shape).to(dtype)

    tensor_quant._orig_dynamic_block_quantize_op = getattr(tensor_quant, "dynamic_block_quantize_op", None)
    tensor_quant.dynamic_block_quantize_op = dynamic_block_quantize_cpu
    # modules that imported the symbol by name
    import modelopt.torch.quantization.nn.modules.tensor_quantizer as tq

    if hasattr(tq, "dynamic_block_quantize_op"):
        tq.dynamic_block_quantize_op = dynamic_block_quantize_cpu


MODELOPT_FIXTURES = {
    "llama-nvfp4": ("llama", "NVFP4_DEFAULT_CFG"),
    "llama-w4a16_nvfp4": ("llama", "W4A16_NVFP4_CFG"),
    "llama-nvfp4_awq": ("llama", "NVFP4_AWQ_LITE_CFG"),
    "qwen3_moe-nvfp4": ("qwen3_moe", "NVFP4_DEFAULT_CFG"),
}


def run_modelopt(name, arch, cfg_name, outdir: Path, era: str, model=None, cfg=None):
    """`cfg`: a quantize config built in code (`cfg_name` then only labels it)."""
    import modelopt.torch.quantization as mtq
    import torch
    from modelopt.torch.export import export_hf_checkpoint

    patch_modelopt_cpu()
    model = make_model(arch) if model is None else model
    cfg = getattr(mtq, cfg_name) if cfg is None else cfg
    ids = calib_ids()

    def forward_loop(m):
        with torch.no_grad():
            for i in range(0, N_CALIB, 4):
                m(input_ids=ids[i : i + 4])

    dense = ref_logits(model)
    model = mtq.quantize(model, cfg, forward_loop)
    quant = ref_logits(model)
    if outdir.exists():
        shutil.rmtree(outdir)
    with torch.inference_mode():
        export_hf_checkpoint(model, export_dir=str(outdir))
    save_tokenizer(outdir)
    save_reference(
        outdir,
        dense,
        quant,
        f"modelopt {cfg_name} fake-quant forward after mtq.quantize, "
        "NVFP4 block quantizer replaced by the CPU quantize-dequantize of "
        f"scripts/make_fixtures.py (approximate); input_ids seed {SEED + 2}",
    )


# --------------------------------------------------------------------------------------------
# manifest / summary
# --------------------------------------------------------------------------------------------
def versions():
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for p in [
        "llmcompressor",
        "compressed-tensors",
        "transformers",
        "torch",
        "nvidia-modelopt",
        "accelerate",
        "datasets",
        "tokenizers",
        "safetensors",
    ]:
        try:
            out[p] = version(p)
        except PackageNotFoundError:
            pass
    return out


def arch_details(arch: str) -> dict:
    """What differs from MANIFEST["common"] for this arch (kept in sync with text_config/llava_config)."""
    d = {
        "llama": dict(model_type="llama", cls="LlamaForCausalLM", tie_word_embeddings=False),
        "mistral": dict(
            model_type="mistral",
            cls="MistralForCausalLM",
            tie_word_embeddings=False,
            note="same tensors as llama (same shapes and seed)",
        ),
        "gemma": dict(
            model_type="gemma2",
            cls="Gemma2ForCausalLM",
            tie_word_embeddings=True,
            query_pre_attn_scalar=HEAD_DIM,
            sliding_window=128,
        ),
        "qwen3": dict(model_type="qwen3", cls="Qwen3ForCausalLM", tie_word_embeddings=False),
        "qwen3_moe": dict(
            model_type="qwen3_moe",
            cls="Qwen3MoeForCausalLM",
            tie_word_embeddings=False,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=128,
            decoder_sparse_step=1,
        ),
        "llava": dict(
            model_type="llava",
            cls="LlavaForConditionalGeneration",
            text_config="llama as above",
            image_token_id=IMAGE_ID,
            vision_config=dict(
                model_type="clip_vision_model",
                hidden_size=128,
                intermediate_size=256,
                num_hidden_layers=2,
                num_attention_heads=2,
                image_size=32,
                patch_size=8,
            ),
            image_seq_length=16,
            processor="LlavaProcessor + CLIPImageProcessor(Pil) 32x32",
        ),
    }
    return d[arch]


def update_manifest(root: Path, entries: dict):
    path = root / "MANIFEST.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data.setdefault("checkpoints", {}).update(entries)
    data["checkpoints"] = dict(sorted(data["checkpoints"].items()))
    data["common"] = dict(
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        vocab_size=VOCAB,
        intermediate_size=INTER,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        dtype="bfloat16",
        tokenizer="byte-level BPE, vocab 512, built by build_tokenizer() in scripts/make_fixtures.py",
        calibration=f"{N_CALIB} random token-id samples x {CALIB_LEN} tokens (seed {SEED + 1})",
    )
    path.write_text(json.dumps(data, indent=2) + "\n")


SHOW = (
    "layers.0.self_attn.o_proj.",
    "layers.0.mlp.down_proj.",
    "layers.0.mlp.experts.0.down_proj.",
    "encoder.layers.0.mlp.fc1.",
)


def check_layout(sf, keys) -> list[str]:
    """Check the NVFP4 invariants of every packed linear; returns a list of problems."""
    problems = []
    for k in keys:
        if k.endswith(".weight_packed"):
            p, gname = k[: -len("weight_packed")], "weight_global_scale"
        elif k.endswith(".weight") and sf.get_slice(k).get_dtype() == "U8":
            p, gname = k[: -len("weight")], "weight_scale_2"
        else:
            continue
        n, half_k = sf.get_slice(k).get_shape()
        if sf.get_slice(k).get_dtype() == "F4":  # header holds the logical shape [N, K]
            half_k //= 2
        sc = sf.get_slice(p + "weight_scale")
        if sc.get_dtype() != "F8_E4M3" or sc.get_shape() != [n, 2 * half_k // 16]:
            problems.append(f"{p}weight_scale {sc.get_dtype()} {sc.get_shape()}")
        g = sf.get_slice(p + gname)
        if g.get_dtype() != "F32" or len(g.get_shape()) > 1 or (g.get_shape() and g.get_shape()[0] != 1):
            problems.append(f"{p}{gname} {g.get_dtype()} {g.get_shape()}")
    return problems


def summarize(root: Path) -> str:
    from safetensors import safe_open

    lines = []
    for d in sorted(p for era in (*ERAS, "mixed") for p in (root / era).glob("*") if p.is_dir()):
        files = sorted(d.glob("*.safetensors"))
        if not files:
            continue
        size = sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
        lines.append(f"### {d.relative_to(root)}  ({size / 1e6:.2f} MB incl. reference/)\n")
        cfg = json.loads((d / "config.json").read_text())
        qc = cfg.get("quantization_config") or {}
        if qc:
            ign = qc.get("ignore", qc.get("exclude_modules"))
            lines.append(
                f"- config.json quantization_config: quant_method={qc.get('quant_method')!r}, "
                f"format={qc.get('format', qc.get('quant_algo'))!r}, ignore={ign}"
            )
        if (d / "hf_quant_config.json").exists():
            hq = json.loads((d / "hf_quant_config.json").read_text()).get("quantization", {})
            lines.append(
                f"- hf_quant_config.json: quant_algo={hq.get('quant_algo')!r}, "
                f"exclude_modules={hq.get('exclude_modules')}"
            )
        rows, counts, problems, nkeys = [], {}, [], 0
        for f in files:
            with safe_open(str(f), "pt") as sf:
                keys = sorted(sf.keys())
                nkeys += len(keys)
                problems += check_layout(sf, keys)
                for k in keys:
                    sl = sf.get_slice(k)
                    dt, shp = sl.get_dtype(), sl.get_shape()
                    suffix = k.rsplit(".", 1)[-1]
                    counts[(suffix, dt)] = counts.get((suffix, dt), 0) + 1
                    if any(s in k for s in SHOW) or ".layers." not in k:
                        rows.append(f"{k:<66} {dt:<8} {shp}")
        lines.append(
            f"- {nkeys} tensors; layout check (uint8 [N,K/2], F8_E4M3 [N,K/16], F32 global): "
            + ("OK" if not problems else "PROBLEMS: " + "; ".join(problems))
        )
        lines.append(
            "- counts by suffix/dtype: "
            + ", ".join(f"{s}/{dt}: {n}" for (s, dt), n in sorted(counts.items()))
        )
        lines.append("- sample tensors (non-layer tensors, one attention and one MLP linear of layer 0):\n")
        lines.append("```")
        lines.extend(rows)
        lines.append("```")
        lines.append("")
    return "\n".join(lines)


def write_summary(root: Path):
    readme = root / "README.md"
    start, end = "<!-- AUTOGEN START -->", "<!-- AUTOGEN END -->"
    text = readme.read_text() if readme.exists() else f"# Test fixtures\n\n{start}\n{end}\n"
    if start not in text:
        text += f"\n{start}\n{end}\n"
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    body = "## Tensor summary (generated by `python scripts/make_fixtures.py --summarize`)\n\n"
    body += summarize(root)
    readme.write_text(head + start + "\n" + body + "\n" + end + tail)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--era", choices=["legacy", "current", "modelopt"])
    ap.add_argument("--out", default="tests/fixtures")
    ap.add_argument("--only", default="", help="comma-separated fixture names (directory names)")
    ap.add_argument("--summarize", action="store_true")
    ap.add_argument("--keep-going", action="store_true", help="record failures and continue")
    args = ap.parse_args()
    root = Path(args.out)
    if args.summarize:
        write_summary(root)
        return
    if not args.era:
        ap.error("--era is required")
    only = {s for s in args.only.split(",") if s}
    if args.era == "modelopt":
        todo = {k: v for k, v in MODELOPT_FIXTURES.items()}
    else:
        todo = ct_fixtures(args.era)
    if only:
        todo = {k: v for k, v in todo.items() if k in only}
    vers = versions()
    failures = {}
    for name, spec in todo.items():
        outdir = root / args.era / name
        cmd = (
            f"fixture-envs/{args.era}/bin/python scripts/make_fixtures.py --era {args.era} "
            f"--out {shlex.quote(str(args.out))} --only {name}"
        )
        t0 = time.time()
        print(f"=== {args.era}/{name} ===", flush=True)
        try:
            if args.era == "modelopt":
                arch, cfg_name = spec
                run_modelopt(name, arch, cfg_name, outdir, args.era)
                entry = dict(producer="nvidia-modelopt", arch=arch, scheme=cfg_name)
            else:
                arch, scheme, ignore = spec
                run_llmcompressor(name, arch, scheme, ignore, outdir, args.era)
                entry = dict(producer="llmcompressor", arch=arch, scheme=scheme, ignore=ignore)
        except Exception as e:  # noqa: BLE001
            import traceback

            traceback.print_exc()
            failures[name] = f"{type(e).__name__}: {e}"
            if not args.keep_going:
                raise
            continue
        entry.update(
            era=args.era,
            seed=SEED,
            path=f"{args.era}/{name}",
            versions=vers,
            env=f"fixture-envs/{args.era}",
            command=cmd,
            torchdynamo_disable=os.environ.get("TORCHDYNAMO_DISABLE") == "1",
            model=arch_details(entry["arch"]),
        )
        update_manifest(root, {f"{args.era}/{name}": entry})
        print(f"--- ok {args.era}/{name} in {time.time() - t0:.1f} s", flush=True)
    if failures:
        print("FAILURES:", json.dumps(failures, indent=2))
        sys.exit(1)


if __name__ == "__main__":
    main()
