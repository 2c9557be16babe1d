"""Append one token's K and V to a static KV cache and advance its length, in one launch.

``append_kv(keys, values, k, v, length)``: keys/values [B, H_kv, L, D] (the transformers
``StaticLayer`` buffers), k/v [B, H_kv, 1, D], length a one-element int64 tensor (the layer's
``cumulative_length``). Writes k and v at position ``length`` and adds 1 to it: what
``StaticLayer.update`` does for one token with two ``index_copy_`` and an ``add_``, three kernels per
layer and token. A position past the cache writes nothing (``StaticLayer`` would fail a device
assert); the fast generation path sizes the cache so that it never happens.

One Triton program does it all (a decode step appends B * H_kv rows of D values), so it can read the
length, write the rows, then store the new length without racing other programs.
``torch.ops.nvfp4_fix.append_kv`` wraps it for torch.compile (a custom op that mutates its inputs);
on devices without Triton it runs the torch ops ``StaticLayer`` runs.
"""

from __future__ import annotations

import os

import torch

from .device import on_device_of

try:
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - no (or a broken) Triton: the torch ops
    triton = None

__all__ = ["append_kv", "supports"]

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_MAX_ROWS = 64  # rows (batch x KV heads) per loop step


if triton is not None:

    @triton.jit
    def _append_kernel(
        kc_ptr, vc_ptr, k_ptr, v_ptr, len_ptr, R, H, L, D,
        skc_b, skc_h, skc_n, svc_b, svc_h, svc_n, sk_b, sk_h, sv_b, sv_h,
        BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        pos = tl.load(len_ptr)
        rows = tl.where(pos < L, R, 0)  # past the cache: write nothing
        d = tl.arange(0, BLOCK_D)
        for r0 in range(0, R, BLOCK_R):
            r = r0 + tl.arange(0, BLOCK_R)
            b = (r // H).to(tl.int64)[:, None]
            h = (r % H).to(tl.int64)[:, None]
            inside = (d < D)[None, :]
            ok = (r < rows)[:, None] & inside
            # the loads do not wait for the length; only the stores depend on it
            kx = tl.load(k_ptr + b * sk_b + h * sk_h + d[None, :], mask=(r < R)[:, None] & inside)
            vx = tl.load(v_ptr + b * sv_b + h * sv_h + d[None, :], mask=(r < R)[:, None] & inside)
            tl.store(kc_ptr + b * skc_b + h * skc_h + pos * skc_n + d[None, :], kx, mask=ok)
            tl.store(vc_ptr + b * svc_b + h * svc_h + pos * svc_n + d[None, :], vx, mask=ok)
        tl.store(len_ptr, pos + 1)


def supports(keys: torch.Tensor, values: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             length: torch.Tensor) -> bool:  # fmt: skip
    """Whether the Triton kernel takes these tensors (else :func:`append_kv` runs the torch ops)."""
    if triton is None or not (keys.is_cuda or (_INTERPRET and keys.device.type == "cpu")):
        return False
    shapes_ok = (
        keys.dim() == 4
        and keys.shape == values.shape
        and k.shape == v.shape == (*keys.shape[:2], 1, keys.shape[3])
        and length.numel() == 1
        and length.dtype == torch.int64
    )
    same_place = all(t.device == keys.device for t in (values, k, v, length))
    same_dtype = keys.dtype == values.dtype == k.dtype == v.dtype
    inner = all(t.stride(-1) == 1 for t in (keys, values, k, v))
    return shapes_ok and same_place and same_dtype and inner


def _append_torch(keys: torch.Tensor, values: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  length: torch.Tensor) -> None:  # fmt: skip
    pos = length.reshape(1).long()
    keys.index_copy_(2, pos, k)
    values.index_copy_(2, pos, v)
    length.add_(1)


def append_kv(keys: torch.Tensor, values: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              length: torch.Tensor) -> None:  # fmt: skip
    """Write k, v ([B, H_kv, 1, D]) at position ``length`` of keys, values ([B, H_kv, L, D]); length += 1."""
    if not supports(keys, values, k, v, length):
        _append_torch(keys, values, k, v, length)
        return
    b, h, cache_len, d = keys.shape
    rows = b * h
    with on_device_of(keys):
        _append_kernel[(1,)](
            keys, values, k, v, length, rows, h, cache_len, d,
            keys.stride(0), keys.stride(1), keys.stride(2),
            values.stride(0), values.stride(1), values.stride(2),
            k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            BLOCK_R=min(_MAX_ROWS, triton.next_power_of_2(rows)), BLOCK_D=triton.next_power_of_2(d),
            num_warps=4,
        )  # fmt: skip


@torch.library.custom_op("nvfp4_fix::append_kv", mutates_args=("keys", "values", "length"))
def _append_kv_op(keys: torch.Tensor, values: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  length: torch.Tensor) -> None:  # fmt: skip
    append_kv(keys, values, k, v, length)


@_append_kv_op.register_fake
def _append_kv_fake(keys, values, k, v, length):
    return None
