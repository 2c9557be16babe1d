"""Batches of prompts in the fast generation path: left padding with an attention mask, stop tokens per
row, sampling settings per row, beams refused.

The reference is ``model.generate`` itself (greedy, float32, the same left-padded ids and mask), row by
row; a row may only differ where the two logits it chose between were within 1e-4 of each other (a
near-tie: the static cache sums attention in another order), which the test then shows.
"""

from __future__ import annotations

import pytest
import torch
from test_generation import checkpoints, load, prompt  # noqa: F401 - the session fixture

from nvfp4_fix.generation import clear_cache, generate, make_sampler, warp_logits

NEAR_TIE = 1e-4


def padded_batch(
    model, lengths: tuple[int, ...], seed: int, pad: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts of the given lengths: ids [B, max] and mask [B, max]."""
    width = max(lengths)
    ids = prompt(model, length=width, batch=len(lengths), seed=seed)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, width - n :] = 1
    return ids.masked_fill(mask == 0, pad), mask


def hf_batch(model, ids, mask, n: int, eos=None, pad: int = 0) -> torch.Tensor:
    from transformers import GenerationConfig

    gc = GenerationConfig(do_sample=False, max_new_tokens=n, eos_token_id=[] if eos is None else eos,
                          pad_token_id=pad, bos_token_id=None)  # fmt: skip
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, generation_config=gc).cpu()


def assert_rows_match(model, ids, mask, got: torch.Tensor, ref: torch.Tensor) -> None:
    """Row by row equal, or parted at a near-tie of model.generate's own logits (then shown)."""
    for row in range(ids.shape[0]):
        a, b = got[row].tolist(), ref[row].tolist()
        if a == b:
            continue
        t = next(i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y)
        with torch.no_grad():
            logits = model(
                input_ids=ref[row : row + 1, :t], attention_mask=_extend(mask[row : row + 1], t)
            ).logits
        gap = abs(float(logits[0, -1, a[t]] - logits[0, -1, b[t]]))
        assert gap <= NEAR_TIE, f"row {row} parts from model.generate at {t} with a logit gap of {gap}"
        print(f"row {row}: near-tie at position {t}, logit gap {gap:.2e}")


def _extend(mask: torch.Tensor, length: int) -> torch.Tensor:
    return torch.cat([mask, mask.new_ones(mask.shape[0], length - mask.shape[1])], dim=1)[:, :length]


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma", "gemma-sw", "mistral-sw"])
def test_left_padded_batch_greedy_matches_generate_row_by_row(checkpoints, arch):  # noqa: F811
    model = load(checkpoints[arch])
    ids, mask = padded_batch(model, (13, 6, 10, 1), seed=21)
    ref = hf_batch(model, ids, mask, 20)
    stats: dict = {}
    got = generate(model, ids, 20, attention_mask=mask, use_cuda_graph=False, stop_token_ids=(), stats=stats)
    assert stats["path"] == "static-loop"
    assert got.shape == ref.shape
    assert_rows_match(model, ids, mask, got, ref)
    # the same prompts one by one, unpadded, give each row's tokens
    for row in (1, 3):
        alone = ids[row : row + 1, mask[row].bool()]
        one = generate(model, alone, 20, use_cuda_graph=False, stop_token_ids=())
        assert one[0, alone.shape[1] :].tolist() == got[row, ids.shape[1] :].tolist()
    # chunked prefill over the padded prompts computes the same
    chunked = generate(model, ids, 20, attention_mask=mask, use_cuda_graph=False, stop_token_ids=(),
                       prefill_chunk=4)  # fmt: skip
    assert chunked.tolist() == got.tolist()


def test_batch_of_64_left_padded_prompts(checkpoints):  # noqa: F811
    model = load(checkpoints["qwen3"])
    lengths = tuple(1 + (7 * i) % 16 for i in range(64))
    ids, mask = padded_batch(model, lengths, seed=27)
    got = generate(model, ids, 8, attention_mask=mask, use_cuda_graph=False, stop_token_ids=())
    assert got.shape == (64, 16 + 8)
    assert_rows_match(model, ids, mask, got, hf_batch(model, ids, mask, 8))


def test_stop_tokens_per_row_in_a_padded_batch(checkpoints):  # noqa: F811
    model = load(checkpoints["llama"])
    ids, mask = padded_batch(model, (5, 12, 9), seed=22)
    free = hf_batch(model, ids, mask, 24)[:, ids.shape[1] :]
    stop = int(free[1, 4])  # row 1 stops at step 4 (or earlier); the others when they emit it
    want = hf_batch(model, ids, mask, 24, eos=stop, pad=0)
    got = generate(model, ids, 24, attention_mask=mask, use_cuda_graph=False, stop_token_ids=[stop],
                   pad_token_id=0, sync_every=3)  # fmt: skip
    assert got.tolist() == want.tolist()
    row1 = got[1, ids.shape[1] :].tolist()
    first = row1.index(stop)
    assert all(t == 0 for t in row1[first + 1 :])  # a stopped row keeps emitting the pad id


def test_unpadded_mask_takes_the_unpadded_path(checkpoints):  # noqa: F811
    model = load(checkpoints["qwen3"])
    clear_cache(model)
    ids = prompt(model, batch=2, seed=23)
    a = generate(model, ids, 8, use_cuda_graph=False, stop_token_ids=())
    b = generate(model, ids, 8, attention_mask=torch.ones_like(ids), use_cuda_graph=False, stop_token_ids=())
    assert a.tolist() == b.tolist()


def test_bad_masks_and_beams_are_refused_with_a_message(checkpoints):  # noqa: F811
    model = load(checkpoints["llama"])
    ids, mask = padded_batch(model, (6, 4), seed=24)
    with pytest.raises(ValueError, match="left-padded"):
        generate(model, ids, 4, attention_mask=mask.flip(1), use_cuda_graph=False)
    with pytest.raises(ValueError, match="shape"):
        generate(model, ids, 4, attention_mask=mask[:, 1:], use_cuda_graph=False)
    with pytest.raises(ValueError, match="only 0"):
        generate(model, ids, 4, attention_mask=mask * 2, use_cuda_graph=False)
    with pytest.raises(ValueError, match="beam search"):
        generate(model, ids, 4, attention_mask=mask, num_beams=4)
    with pytest.raises(ValueError, match="3 values for a batch of 2"):
        generate(model, ids, 4, attention_mask=mask, temperature=[1.0, 1.0, 0.5], use_cuda_graph=False)


def test_padded_batch_through_the_model_generate_fallback(checkpoints):  # noqa: F811
    model = load(checkpoints["llama"])
    ids, mask = padded_batch(model, (7, 3), seed=25)
    stats: dict = {}
    got = generate(model, ids, 6, attention_mask=mask, stop_token_ids=(), stats=stats)  # CPU: fallback
    assert stats["path"] == "model.generate"
    assert got.tolist() == hf_batch(model, ids, mask, 6).tolist()


# --------------------------------------------------------------------------------------------------
# sampling per row
# --------------------------------------------------------------------------------------------------
def test_per_row_warping_matches_transformers_row_by_row():
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 300, generator=g) * 3
    temps, ks, ps = (0.7, 1.0, 1.3, 2.0), (0, 20, 5, 300), (1.0, 0.8, 0.9, 0.05)
    got = warp_logits(logits, torch.tensor(temps), torch.tensor(ks), torch.tensor(ps), k_max=300)
    for row, (t, k, p) in enumerate(zip(temps, ks, ps, strict=True)):
        ref = TemperatureLogitsWarper(t)(None, logits[row : row + 1].clone())
        if k:
            ref = TopKLogitsWarper(k)(None, ref)
        if p < 1.0:
            ref = TopPLogitsWarper(p)(None, ref)
        assert torch.equal(torch.isinf(got[row : row + 1]), torch.isinf(ref)), row
        torch.testing.assert_close(got[row][~torch.isinf(got[row])], ref[~torch.isinf(ref)])


def test_per_row_sampler_draws_each_rows_distribution():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0])
    logits = probs.clamp_min(1e-30).log().expand(30000, -1).repeat(3, 1)
    n = logits.shape[0] // 3
    # row blocks: greedy, top-k 2, top-p 0.7 (each row its own settings)
    temps = [0.0] * n + [1.0] * n + [1.0] * n
    ks = [0] * n + [2] * n + [0] * n
    ps = [1.0] * n + [1.0] * n + [0.7] * n
    gen = torch.Generator().manual_seed(0)
    tokens = make_sampler(temps, ks, ps, generator=gen)(logits)
    assert (tokens[:n] == 0).all()
    for block in (1, 2):
        counts = torch.bincount(tokens[block * n : (block + 1) * n], minlength=5).float() / n
        torch.testing.assert_close(counts, torch.tensor([0.625, 0.375, 0, 0, 0]), atol=0.015, rtol=0)
    # the generator decides the draws: same seed, same tokens; another seed, others
    again = make_sampler(torch.tensor(temps), ks, ps, generator=torch.Generator().manual_seed(0))(logits)
    other = make_sampler(temps, ks, ps, generator=torch.Generator().manual_seed(1))(logits)
    assert torch.equal(tokens, again) and not torch.equal(tokens, other)


def test_per_row_sampling_in_a_batch(checkpoints):  # noqa: F811
    model = load(checkpoints["llama"])
    ids, mask = padded_batch(model, (9, 5, 7), seed=26)
    greedy = generate(model, ids, 10, attention_mask=mask, use_cuda_graph=False, stop_token_ids=())

    def run(seed: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        return generate(model, ids, 10, attention_mask=mask, temperature=[0.0, 1.0, 0.9],
                        top_k=[None, 1, 50], top_p=[None, None, 0.95], generator=gen,
                        stop_token_ids=())  # fmt: skip

    a, b, c = run(3), run(3), run(4)
    assert a.tolist() == b.tolist()  # on the CPU too (per-row settings: the eager static loop)
    assert a[:2].tolist() == greedy[:2].tolist()  # row 0 greedy, row 1 top-k 1: the argmax
    assert not torch.equal(a[2], c[2]) or not torch.equal(a[2], greedy[2])


# --------------------------------------------------------------------------------------------------
# the command line: --batch
# --------------------------------------------------------------------------------------------------
def test_generate_and_bench_commands_take_a_batch(checkpoints, capsys):  # noqa: F811
    from nvfp4_fix import settings
    from nvfp4_fix.cli import main

    path = str(checkpoints["llama"])
    with settings.override(kernel="reference"):  # the tools do not care which kernel runs
        code = main(["generate", path, "w1 w2", "--batch", "3", "--max-new-tokens", "5", "--temperature", "0",
                     "--fast", "--no-chat-template"])  # fmt: skip
        out, err = capsys.readouterr()
        assert code == 0, err
        rows = [line for line in out.splitlines() if line.startswith("[")]
        assert [r[:3] for r in rows] == ["[0]", "[1]", "[2]"]
        assert len({r[3:] for r in rows}) == 1  # greedy: the same prompt gives the same text in every row
        assert "--- batch 3:" in out and "tok/s for the batch" in out
        code = main(["generate", path, "w1", "--batch", "0"])
        assert code == 2 and "--batch must be at least 1" in capsys.readouterr().err
        code = main(["bench", path, "--batch", "2", "--prompt-tokens", "8", "--new-tokens", "3", "--fast"])
        out, err = capsys.readouterr()
        assert code == 0, err
        assert "batch 2, decode through nvfp4_fix.generate" in out and "| decode  |      6 |" in out


# --------------------------------------------------------------------------------------------------
# GPU: padded batches and per-row sampling inside the captured graph
# --------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma-sw"])
def test_gpu_padded_batch_in_a_cuda_graph(checkpoints, arch):  # noqa: F811
    model = load(checkpoints[arch], torch.float32, "cuda")
    clear_cache(model)
    ids, mask = padded_batch(model, (13, 6, 10, 1, 9, 12, 3, 13), seed=31)
    ids, mask = ids.cuda(), mask.cuda()
    stats: dict = {}
    got = generate(model, ids, 30, attention_mask=mask, stop_token_ids=(), stats=stats).cpu()
    assert stats["path"] == "cuda-graph", stats
    assert_rows_match(model, ids, mask, got.cuda(), hf_batch(model, ids, mask, 30).cuda())
    eager = generate(model, ids, 30, attention_mask=mask, stop_token_ids=(), use_cuda_graph=False).cpu()
    assert got.tolist() == eager.tolist()  # the graph replays the eager step's kernels
    # per-row sampling with a generator: reproducible through graph replays
    runs = []
    for seed in (5, 5, 6):
        gen = torch.Generator("cuda").manual_seed(seed)
        runs.append(generate(model, ids, 20, attention_mask=mask, temperature=[0.0] + [1.0] * 7, top_k=50,
                             generator=gen, stop_token_ids=()).cpu())  # fmt: skip
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    assert torch.equal(runs[0][0, : ids.shape[1] + 20], got[0, : ids.shape[1] + 20])  # row 0 greedy
