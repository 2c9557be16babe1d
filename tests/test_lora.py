"""LoRA on a packed NVFP4 base (issue 17), on the CPU with real peft and the shipped checkpoints.

Reference for every gradient (tests/lora_helpers.py): the same model with each NVFP4Linear replaced by
a float32 nn.Linear holding the float64 dequantization of its packed weight (AWQ pre-scale and W4A4
activation fake-quantization applied by a pre-hook, the latter with a straight-through gradient), the
same LoRA adapters (same values) and the same batch. Tolerances are relative L2 errors of whole gradients:
the two models do the same float32 math in another order (1e-6 is typical).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import transformers

peft = pytest.importorskip("peft")

from lora_helpers import (  # noqa: E402
    adapted_pair,
    batch,
    load,
    lora_config,
    randomize_adapters,
    rel,
    step_grads,
)

from nvfp4_fix import lora  # noqa: E402
from nvfp4_fix.layer import NVFP4Linear, fake_quantize_activations  # noqa: E402

ROOT = Path(__file__).parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
DEMO = FIXTURES / "demo" / "ct-nvfp4a16"
CASES = {
    "ct-nvfp4a16": (FIXTURES / "demo" / "ct-nvfp4a16", 1e-5),
    "ct-nvfp4 (W4A4)": (FIXTURES / "demo" / "ct-nvfp4", 1e-4),  # measured 2.5e-6; rounding ties may flip
    "modelopt-awq": (FIXTURES / "modelopt" / "llama-nvfp4_awq", 1e-5),
    "qwen3_moe-nvfp4a16": (FIXTURES / "current" / "qwen3_moe-nvfp4a16", 1e-5),
    "qwen3_moe-nvfp4 (W4A4)": (FIXTURES / "current" / "qwen3_moe-nvfp4", 1e-4),
}


@pytest.mark.parametrize("case", list(CASES))
def test_lora_gradients_match_dense_float64_reference(case: str) -> None:
    path, tol = CASES[case]
    packed, dense = adapted_pair(path)
    layers = [m for m in packed.modules() if isinstance(m, lora.NVFP4LoraLinear)]
    assert len(layers) >= 7 and not any(isinstance(m, NVFP4Linear) for m in dense.modules())
    ids = batch(packed)
    gp, gd = step_grads(packed, ids), step_grads(dense, ids)
    assert gp.keys() == gd.keys() and len(gp) == 2 * len(layers) + 1
    worst = max(rel(gp[n], gd[n]) for n in gp)
    assert all(gd[n].norm() > 0 for n in gd), "a zero reference gradient proves nothing"
    print(f"{case}: worst relative gradient error {worst:.2e}")
    assert worst < tol, f"{case}: worst relative gradient error {worst:.2e} >= {tol:.0e}"


MIXED = FIXTURES / "mixed" / "llama-nvfp4-fp8dynamic-fp8static"


@pytest.mark.parametrize("activations,tol", [("bf16", 1e-5), ("quantize", 2e-2)])
def test_lora_on_a_mixed_checkpoint_adapts_the_fp8_layers_too(activations: str, tol: float) -> None:
    """llmcompressor's NVFP4 W4A4 MLP + FP8 attention (dynamic per-token and static activations): the FP8
    q/k/v/o get FP8LoraLinear, the MLP NVFP4LoraLinear, and every gradient matches the float64 reference
    (FP8 weights and activation quantization from tools.fp8_reference). Weight-only: measured 1.2e-6.
    With activation quantization the worst, 5.1e-3, is in layer 1's W4A4 MLP: inputs that differ in the
    last bits (another summation order) flip a few NVFP4 activation codes there."""
    packed, dense = adapted_pair(MIXED, activations=activations)
    fp8 = [m for m in packed.modules() if isinstance(m, lora.FP8LoraLinear)]
    nvfp4 = [m for m in packed.modules() if type(m) is lora.NVFP4LoraLinear]
    assert len(fp8) == 8 and len(nvfp4) == 6
    ids = batch(packed)
    gp, gd = step_grads(packed, ids), step_grads(dense, ids)
    assert gp.keys() == gd.keys() and all(gd[n].norm() > 0 for n in gd)
    worst = max(rel(gp[n], gd[n]) for n in gp)
    print(f"mixed, activations={activations}: worst relative gradient error {worst:.2e}")
    assert worst < tol


def test_lora_on_fp8_layers_saves_loads_and_refuses_to_merge(tmp_path: Path) -> None:
    """The FP8 layers' adapters round-trip through save_pretrained / PeftModel.from_pretrained; "all-linear"
    picks the FP8 layers; merging into FP8 is refused with a message, the base untouched."""
    model = peft.get_peft_model(load(MIXED), lora_config(target_modules="all-linear"))
    assert sum(isinstance(m, lora.FP8LoraLinear) for m in model.modules()) == 8
    values = randomize_adapters(model)
    ids = batch(model)
    with torch.no_grad():
        want = model(ids).logits
    model.save_pretrained(tmp_path)
    again = peft.PeftModel.from_pretrained(load(MIXED), tmp_path)
    with torch.no_grad():
        assert torch.equal(again(ids).logits, want)
    assert all(torch.equal(again.state_dict()[n], v) for n, v in values.items())
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    before = q.get_base_layer().weight.view(torch.uint8).clone()
    with pytest.raises(NotImplementedError, match="merging LoRA into an FP8 layer"):
        q.merge()
    assert torch.equal(q.get_base_layer().weight.view(torch.uint8), before)


def test_base_stays_packed_frozen_and_bit_identical_after_training() -> None:
    model = peft.get_peft_model(load(FIXTURES / "demo" / "ct-nvfp4"), lora_config())
    base = {
        n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad and "lora_" not in n
    }
    packed = [n for n in base if n.endswith("weight_packed")]
    assert len(packed) == 28 and all(base[n].dtype == torch.uint8 for n in packed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    ids = batch(model)
    losses = []
    for _ in range(4):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for n, p in model.named_parameters():
        if n in base:
            assert p.grad is None and torch.equal(p.detach(), base[n]), n


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    model = peft.get_peft_model(load(FIXTURES / "demo" / "ct-nvfp4"), lora_config())
    randomize_adapters(model)
    model.train()
    ids = batch(model)
    plain = step_grads(model, ids)
    for kwargs in ({"use_reentrant": False}, {"use_reentrant": True}):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        model.enable_input_require_grads()
        assert model.base_model.model.model.gradient_checkpointing
        ckpt = step_grads(model, ids)
        assert max(rel(ckpt[n], plain[n]) for n in plain) < 1e-6, kwargs
        model.gradient_checkpointing_disable()


def test_reentrant_checkpointing_trains_without_enable_input_require_grads() -> None:
    """transformers 4.57's default checkpointing is reentrant: the packed base is frozen, so without the
    quantizer's training hook on the input embeddings the adapters would get no gradient at all."""

    def lora_grads(model: torch.nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor | None]:
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    reference = peft.get_peft_model(load(FIXTURES / "demo" / "ct-nvfp4a16"), lora_config())
    randomize_adapters(reference)
    reference.train()
    ids = batch(reference)
    plain = lora_grads(reference, ids)
    base = load(FIXTURES / "demo" / "ct-nvfp4a16")
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model = peft.get_peft_model(base, lora_config())  # the QLoRA recipe's order: checkpointing first
    model.load_state_dict(reference.state_dict())
    model.train()
    ckpt = lora_grads(model, ids)
    assert set(ckpt) == set(plain) and all(g is not None for g in ckpt.values())
    assert max(rel(ckpt[n], plain[n]) for n in plain) < 1e-6
    model.eval()
    with torch.no_grad():
        assert not model(input_ids=ids).logits.requires_grad  # inference untouched


def test_bf16_autocast_gradients_close_to_float32() -> None:
    packed, dense = adapted_pair(DEMO)
    ids = batch(packed)
    ref = step_grads(dense, ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = step_grads(packed, ids)
    worst = max(rel(got[n], ref[n]) for n in ref)
    assert math.isfinite(worst) and worst < 0.05, worst


@pytest.mark.parametrize("fixture", ["ct-nvfp4a16", "ct-nvfp4"])
def test_compiled_step_matches_eager(fixture: str) -> None:
    """torch.compile(fullgraph) through the custom op's registered backward (and, W4A4, the STE)."""
    model = peft.get_peft_model(load(FIXTURES / "demo" / fixture), lora_config())
    randomize_adapters(model)
    layer = model.base_model.model.model.layers[0].mlp.down_proj
    assert isinstance(layer, lora.NVFP4LoraLinear)
    x = torch.randn(3, 5, 688, generator=torch.Generator().manual_seed(2))
    r = torch.randn(3, 5, 256, generator=torch.Generator().manual_seed(3))

    def grads(fn) -> list[torch.Tensor]:  # noqa: ANN001
        xi = x.clone().requires_grad_()
        (fn(xi) * r).sum().backward()
        out = [xi.grad, layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad]
        layer.zero_grad(set_to_none=True)
        return out

    eager = grads(layer)
    torch._dynamo.reset()
    compiled = grads(torch.compile(layer, fullgraph=True, dynamic=False))
    for a, b in zip(compiled, eager, strict=True):
        assert b.norm() > 0 and rel(a, b) < 1e-5


def test_w4a4_straight_through_estimator() -> None:
    """The gradient through the activation fake-quantization is the identity (and the forward keeps
    the quantized bits)."""
    layer = next(m for m in load(FIXTURES / "demo" / "ct-nvfp4").modules() if isinstance(m, NVFP4Linear))
    x = torch.randn(4, layer.in_features, generator=torch.Generator().manual_seed(4)).requires_grad_()
    q = layer.prepare_input(x)
    assert torch.equal(q.detach(), fake_quantize_activations(x.detach(), layer.input_divisor))
    assert not torch.equal(q.detach(), x.detach())
    g = torch.randn_like(q)
    q.backward(g)
    assert torch.equal(x.grad, g)


def test_save_and_load_adapter_on_packed_base(tmp_path: Path) -> None:
    model = peft.get_peft_model(load(DEMO), lora_config())
    randomize_adapters(model)
    ids = batch(model)
    with torch.no_grad():
        want = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    files = {p.name for p in tmp_path.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files
    again = peft.PeftModel.from_pretrained(load(DEMO), tmp_path)
    assert sum(isinstance(m, lora.NVFP4LoraLinear) for m in again.modules()) == 28
    with torch.no_grad():
        got = again(input_ids=ids).logits
    assert torch.equal(got, want)
    with again.disable_adapter(), torch.no_grad():
        assert rel(again(input_ids=ids).logits, want) > 1e-3  # the adapter does something


def test_refusals_are_clear() -> None:
    model = load(DEMO)
    with pytest.raises(ValueError, match="DoRA"):
        peft.get_peft_model(model, lora_config(use_dora=True))
    with pytest.raises(ValueError, match="init_lora_weights='pissa'"):
        peft.get_peft_model(load(DEMO), lora_config(init_lora_weights="pissa"))
    unloaded = peft.get_peft_model(load(DEMO), lora_config()).unload()  # dropping adapters is fine
    assert sum(isinstance(m, NVFP4Linear) for m in unloaded.modules()) == 28


def test_prepare_model_for_kbit_training_then_train() -> None:
    model = peft.prepare_model_for_kbit_training(load(DEMO, torch.bfloat16))
    pm = peft.get_peft_model(model, lora_config())
    assert all(p.dtype != torch.bfloat16 for p in pm.parameters())  # norms/embeddings upcast, as for bnb
    ids = batch(pm)
    pm(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for p in pm.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


def test_explicit_registration_and_uninstall() -> None:
    assert lora.installed()
    try:
        assert lora.uninstall() and not lora.installed()
        with pytest.raises(ValueError, match="not supported"):
            peft.get_peft_model(load(DEMO), lora_config())  # peft alone refuses the packed layer
        cfg = lora_config()
        cfg._register_custom_module(lora.custom_modules())
        pm = peft.get_peft_model(load(DEMO), cfg)
        assert sum(isinstance(m, lora.NVFP4LoraLinear) for m in pm.modules()) == 28
    finally:
        lora.install()
    assert lora.installed()


def test_moe_experts() -> None:
    """Packed experts are one NVFP4Linear per expert and projection. transformers 4: target_modules
    adapts each expert (their gradients are checked against the dense reference above). transformers 5:
    peft rewrites expert targets to target_parameters on the fused 3-D weights, which a packed block
    does not have; peft warns that nothing matched and the experts get no adapter (the backward still
    runs through them, see the reference test)."""
    path = FIXTURES / "current" / "qwen3_moe-nvfp4a16"
    cfg = lora_config(target_modules=["q_proj", "gate_proj", "up_proj", "down_proj"])
    if int(transformers.__version__.split(".")[0]) < 5:
        model = peft.get_peft_model(load(path), cfg)
        experts = [
            n for n, m in model.named_modules() if isinstance(m, lora.NVFP4LoraLinear) and ".experts." in n
        ]
        assert len(experts) == 2 * 4 * 3  # layers x experts x projections
        return
    with pytest.warns(RuntimeWarning, match="no parameter was matched"):
        model = peft.get_peft_model(load(path), cfg)
    adapted = {n.split(".lora_")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert adapted and all(n.endswith("q_proj") for n in adapted)


def test_lora_learns_unseen_docstrings() -> None:
    """LoRA on the packed demo model, 16 steps on peft's docstrings (never seen by the stdlib-trained
    model), lowers perplexity on a held-out split of them by more than 30% (measured: 142.0 -> 68.2)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_lora_demo", ROOT / "scripts" / "train_lora_demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    r = demo.run(steps=16, batch=6, lr=5e-3, eval_windows=24, log=False)
    assert r["held_docs"] >= 50 and r["train_tokens"] > 50_000
    assert r["ppl_after"] < 0.7 * r["ppl_before"], r


def test_transformers_trainer_trains_the_adapters(tmp_path: Path) -> None:
    """Trainer accepts the packed model (were it marked quantized, its quantizer must be trainable) and
    trains the adapters with gradient checkpointing; the packed base is untouched."""
    model = peft.get_peft_model(load(DEMO), lora_config())
    hf_quantizer = getattr(model.get_base_model(), "hf_quantizer", None)
    assert hf_quantizer is None or hf_quantizer.is_trainable
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    rows = [{"input_ids": ids, "labels": ids} for ids in batch(model, shape=(8, 32)).tolist()]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )
    transformers.Trainer(model=model, args=args, train_dataset=rows).train()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed == {n for n, p in model.named_parameters() if p.requires_grad} and changed


def test_autograd_keeps_no_dense_weight() -> None:
    """What autograd saves for the backward of a LoRA step holds no dense copy of any packed weight."""
    model = peft.get_peft_model(load(FIXTURES / "modelopt" / "llama-nvfp4_awq"), lora_config())
    dense_shapes = {
        s
        for m in model.modules()
        if isinstance(m, NVFP4Linear)
        for s in ((m.out_features, m.in_features), (m.in_features, m.out_features))
    }
    saved: list[torch.Tensor] = []
    ids = batch(model)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    assert saved and any(t.dtype == torch.uint8 for t in saved)  # the packed codes, by reference
    dense = [tuple(t.shape) for t in saved if t.is_floating_point() and tuple(t.shape) in dense_shapes]
    assert not dense, dense
    loss.backward()


def test_all_linear_targets_every_packed_layer_and_a_second_adapter() -> None:
    model = peft.get_peft_model(load(DEMO), lora_config(target_modules="all-linear"))
    layers = {n: m for n, m in model.named_modules() if isinstance(m, lora.NVFP4LoraLinear)}
    assert len(layers) == 28 and not any(
        "lm_head" in n for n in layers
    )  # the output head stays out, as in peft
    model.add_adapter("second", lora_config(target_modules="all-linear"))
    again = {n: m for n, m in model.named_modules() if isinstance(m, lora.NVFP4LoraLinear)}
    assert again.keys() == layers.keys()  # no adapter nested inside an adapter
    assert all(set(m.lora_A) == {"default", "second"} for m in again.values())


def test_peft_learns_the_packed_layer_whatever_the_import_order() -> None:
    """Loading a packed model imports no peft (1.7 s); importing peft afterwards installs the
    dispatcher (the lora_hook finder), so a plain get_peft_model works in a fresh process."""
    import subprocess
    import sys

    code = f"""
import sys, nvfp4_fix
model = nvfp4_fix.from_pretrained({str(DEMO)!r})
assert "peft" not in sys.modules
import peft
from nvfp4_fix.lora import NVFP4LoraLinear
pm = peft.get_peft_model(model, peft.LoraConfig(target_modules=["q_proj", "down_proj"]))
print(sum(isinstance(m, NVFP4LoraLinear) for m in pm.modules()))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == "8"


@pytest.mark.parametrize(
    "path,std,bound",
    # AWQ: the update is divided by the pre-scale, and this random fixture's logits react strongly
    [(DEMO, 0.15, 0.25), (FIXTURES / "modelopt" / "llama-nvfp4_awq", 0.05, 0.5)],
    ids=["ct", "modelopt-awq"],
)
def test_merge_requantizes_to_nvfp4_and_unmerge_restores_the_bytes(
    path: Path, std: float, bound: float, tmp_path: Path
) -> None:
    """Measured: ct 0.183 vs 1.232 (ratio 0.15), AWQ 0.28 vs 0.96 (0.29). The q/k/v and gate/up
    groups are fused (row views of one buffer, as on CUDA): the merge writes through the views."""
    from nvfp4_fix.fusion import fuse_siblings

    model = load(path)
    n_groups = fuse_siblings(model, ("cpu",))
    assert n_groups == 2 * model.config.num_hidden_layers
    model = peft.get_peft_model(model, lora_config())
    randomize_adapters(model, std=std)  # updates well above NVFP4's rounding step (small ones vanish)
    ids = batch(model)
    packed = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}

    def logits() -> torch.Tensor:
        with torch.no_grad():
            return model(input_ids=ids).logits

    adapted = logits()
    with model.disable_adapter():
        base = logits()
    with pytest.warns(UserWarning, match="re-quantizes"):
        model.merge_adapter()
    merged = logits()
    model.unmerge_adapter()
    assert all(torch.equal(p, packed[n]) for n, p in model.named_parameters() if n in packed)
    assert torch.equal(logits(), adapted)
    # re-quantization keeps most of what the adapter changes
    print(f"merged vs adapter {rel(merged, adapted):.3f}, base vs adapter {rel(base, adapted):.3f}")
    assert rel(merged, adapted) < bound * rel(base, adapted)
    with pytest.warns(UserWarning, match="re-quantizes"):
        plain = model.merge_and_unload()
    assert not any(isinstance(m, lora.NVFP4LoraLinear) for m in plain.modules())
    layers = [m for m in plain.modules() if isinstance(m, NVFP4Linear)]
    assert len(layers) == sum(isinstance(m, NVFP4Linear) for m in load(path).modules()) and all(
        m.weight_packed.dtype == torch.uint8 for m in layers
    )
    with torch.no_grad():
        assert torch.equal(plain(input_ids=ids).logits, merged)
    groups = {id(m._fused): m._fused for m in layers if m._fused is not None}
    assert len(groups) == n_groups and all(g.intact() for g in groups.values())
    for m in layers:
        if m._fused is not None:
            lo, hi = m._fused.offsets[m._fused_index], m._fused.offsets[m._fused_index + 1]
            assert torch.equal(m._fused.packed[lo:hi], m.weight_packed)
    plain.save_pretrained(tmp_path)  # an NVFP4 checkpoint again, in the base's own layout
    with torch.no_grad():
        assert torch.equal(load(tmp_path)(input_ids=ids).logits, merged)


def test_compute_dtype_follows_the_model() -> None:
    model = load(DEMO, torch.bfloat16)
    layer = next(m for m in model.modules() if isinstance(m, NVFP4Linear))
    assert layer.compute_dtype == torch.bfloat16
    layer.float()  # (transformers refuses .float() on a quantized model; a module can still be cast)
    assert layer.compute_dtype == torch.float32 and layer.weight_packed.dtype == torch.uint8
    layer.to(torch.float16)
    assert layer.compute_dtype == torch.float16
    layer.to("cpu")
    assert layer.compute_dtype == torch.float16


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_kbit_recipe_keeps_half_precision_gemms() -> None:
    """prepare_model_for_kbit_training upcasts norms and embeddings, so float32 activations reach the
    packed layers: they compute in the model's bf16 (as bitsandbytes' compute_dtype) and return float32."""
    import nvfp4_fix

    model = peft.prepare_model_for_kbit_training(nvfp4_fix.from_pretrained(DEMO, device_map="cuda"))
    pm = peft.get_peft_model(model, lora_config())
    layer = pm.base_model.model.model.layers[0].mlp.down_proj.base_layer
    x = torch.randn(64, layer.in_features, device="cuda")
    y = layer(x)
    assert y.dtype == torch.float32 and torch.equal(y, layer(x.bfloat16()).float())
    ids = batch(pm).cuda()
    pm(input_ids=ids, labels=ids).loss.backward()
    assert all(
        p.grad is not None and torch.isfinite(p.grad).all() for p in pm.parameters() if p.requires_grad
    )
