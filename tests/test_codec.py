"""The codec against the independent numpy reference, on random data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference import E2M1, dequantize_np, e4m3_to_float

from nvfp4_fix.codec import NVFP4FormatError, dequantize, pack, quantize, round_to_e2m1_codes, unpack


def test_e2m1_table_and_e4m3_decoding_agree_with_torch() -> None:
    codes = torch.arange(16, dtype=torch.uint8)
    got = dequantize(
        pack(codes.reshape(1, 16)), torch.ones(1, 1).to(torch.float8_e4m3fn), torch.tensor(1.0), "multiplier"
    )
    assert np.array_equal(got.numpy().ravel(), E2M1.astype(np.float32))
    bits = torch.arange(256, dtype=torch.uint8)
    ours = bits.view(torch.float8_e4m3fn).float().numpy()
    theirs = e4m3_to_float(bits.numpy())
    assert np.array_equal(np.isnan(ours), np.isnan(theirs))
    finite = ~np.isnan(theirs)
    assert np.array_equal(ours[finite], theirs[finite])


def test_pack_unpack_is_a_bijection_and_low_nibble_is_even_column() -> None:
    every_byte = torch.arange(256, dtype=torch.uint8).reshape(4, 64)
    codes = unpack(every_byte)
    assert torch.equal(codes[:, 0::2], every_byte & 0xF)
    assert torch.equal(pack(codes), every_byte)


@pytest.mark.parametrize("n,k", [(1, 16), (7, 48), (97, 272), (64, 688)])
@pytest.mark.parametrize("convention", ["divisor", "multiplier"])
def test_dequantize_matches_independent_reference(n: int, k: int, convention: str) -> None:
    g = torch.Generator().manual_seed(n * k)
    packed = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=g)
    scale = (torch.rand(n, k // 16, generator=g) * 3 + 0.01).to(torch.float8_e4m3fn)
    glob = torch.tensor([1234.5]) if convention == "divisor" else torch.tensor(3.7e-4)
    ours = dequantize(packed, scale, glob, convention, torch.float64).numpy()
    ref = dequantize_np(packed.numpy(), scale.view(torch.uint8).numpy(), float(glob), convention)
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=0)  # float32 product of exact factors


@pytest.mark.parametrize("convention", ["divisor", "multiplier"])
def test_quantize_roundtrip_error_bound(convention: str) -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 272, generator=g) * torch.rand(96, 1, generator=g) * 0.1
    packed, scale, glob = quantize(w, convention)
    back = dequantize(packed, scale, glob, convention)
    step = scale.float().repeat_interleave(16, dim=1) * (1 / glob if convention == "divisor" else glob)
    # within a block: half the widest E2M1 gap (2, between 4 and 6) times the block step, plus the
    # e4m3 rounding of the block scale (relative 2^-4 of the block maximum, 6 steps).
    bound = step * 1.0 + step * 6 * 2**-4
    assert (w - back).abs().le(bound + 1e-12).all()
    rel = float((w - back).norm() / w.norm())
    assert 0.05 < rel < 0.15, rel  # ~0.095 is what NVFP4 gives on Gaussian weights


def test_conventions_agree_after_conversion() -> None:
    w = torch.randn(32, 64)
    p_div, s_div, g_div = quantize(w, "divisor")
    as_mul = dequantize(p_div, s_div, 1.0 / g_div, "multiplier")
    assert torch.allclose(dequantize(p_div, s_div, g_div, "divisor"), as_mul, rtol=1e-6, atol=0)


def test_round_to_e2m1_ties_go_to_even_codes() -> None:
    x = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -5.0, 7.0])
    assert E2M1[round_to_e2m1_codes(x).long().numpy()].tolist() == [0, 1, 1, 2, 2, 4, 4, -0.0, -4, 6]


def test_bad_shapes_are_clear_errors() -> None:
    with pytest.raises(NVFP4FormatError, match="multiple of the block size"):
        quantize(torch.randn(4, 40))
    with pytest.raises(NVFP4FormatError, match="expected"):
        dequantize(
            torch.zeros(4, 8, dtype=torch.uint8),
            torch.zeros(4, 2).to(torch.float8_e4m3fn),
            torch.ones(1),
            "divisor",
        )
