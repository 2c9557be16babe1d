"""The CUDA C++ of ``cuda_tile`` (kernels/cuda_tile.py): an mma.sync GEMM for 9 to a few hundred token rows
that decodes each NVFP4 weight once per token tile of BM rows. Nothing here needs a GPU.

It is appended to cuda_mma's source (``load_slot``, ``scale_pairs``, ``dec``, ``scl``: a warp loads and
decodes its 16 x RT weight rows exactly as cuda_mma does, in the checkpoint layout). Warps sit side by side
over N; the block's BM token rows of a 128-wide K chunk keep their natural layout (BM rows x 256 bytes) in a
ring of XST chunk stages that ``cp.async`` fills XST - 1 chunks ahead, and every warp builds its B fragments
from there. A K split stores float32 partial sums; the last split of a tile to arrive (a counter per tile,
reset by that block) adds all of them in split order and writes y, so a call is one launch and its bytes do
not depend on which split arrives last.

(Sessions 16-17 kept a wgmma kernel beside it, measured slower at every point and deleted:
benchmarks/RESULTS-kernels-tile.md and KERNEL_NOTES.md say why; its source is in git history before the
commit that removed it.)
"""

from __future__ import annotations

import torch

from . import cuda_mma_src

_COMMON = r"""
__device__ __forceinline__ u32 smem_addr(const void* p) {
  u32 a;
  asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
  return a;
}
"""

_FUNCTIONS = r"""
// mma.sync kernel: a chunk's activations stay in their natural layout (BM rows x 256 bytes), copied in by
// cp.async three chunks ahead (no registers held); 16-byte piece c of row r lies at piece
// c ^ 2 (c >> 3) ^ (r & 1), so that the 8 lanes of a quarter warp reading (row g, piece 4t + q) hit 8
// different bank groups.
__device__ __forceinline__ u32 piece(int r, int c) { return (u32)(c ^ (((c >> 3) & 1) << 1) ^ (r & 1)); }

__device__ __forceinline__ void copy_x_chunk(u32 stage, const u16* x, int ldx, int m0, int M, int c) {
#pragma unroll
  for (int i = 0; i < BM * 16 / THREADS; ++i) {
    const int p = threadIdx.x + i * THREADS, r = p >> 4, k = p & 15;
    const u16* src = x + (u64)min(m0 + r, M - 1) * ldx + c * 128 + k * 8;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;"
                 :: "r"(stage + r * 256 + piece(r, k) * 16), "l"(src) : "memory");
  }
  asm volatile("cp.async.commit_group;" ::: "memory");
}
__device__ __forceinline__ void wait_x_copies() {  // all but the newest XST - 2 chunks have landed
  asm volatile("cp.async.wait_group %0;" :: "n"(XST - 2) : "memory");
}
__device__ __forceinline__ U4 ld_shared4(u32 a) {
  U4 r;
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "r"(a));
  return r;
}

// One chunk of a warp: RT tiles of 16 weight rows against the block's BM / 8 token tiles; each quarter's
// A fragments are decoded once and meet every token tile (the B fragments as cuda_mma builds them).
__device__ __forceinline__ void compute_tile(const Slot& S, float* acc, u32 stage, int g, int t) {
  u32 sc[RT_][2][2];
#pragma unroll
  for (int r = 0; r < RT_; ++r) {
    scale_pairs(S.s[r][0], sc[r][0][0], sc[r][0][1]);
    scale_pairs(S.s[r][1], sc[r][1][0], sc[r][1][1]);
  }
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    u32 a[RT_][2][4];
#pragma unroll
    for (int r = 0; r < RT_; ++r)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const u32 wa = S.q[r][0][q], wb = S.q[r][1][q], sa = sc[r][0][q >> 1], sb = sc[r][1][q >> 1];
        a[r][h][0] = scl(dec(wa << (8 * h)), sa);
        a[r][h][1] = scl(dec(wb << (8 * h)), sb);
        a[r][h][2] = scl(dec(wa << (8 * h + 4)), sa);
        a[r][h][3] = scl(dec(wb << (8 * h + 4)), sb);
      }
    const u32 at = stage + g * 256 + piece(g, 4 * t + q) * 16;  // token rows 8j + g: same piece
#pragma unroll
    for (int j = 0; j < BM / 8; ++j) {
      const U4 v = ld_shared4(at + j * 2048);
      const u32 X[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const u32 b0 = prmt(X[1 - h], X[3 - h], 0x7632u), b1 = prmt(X[1 - h], X[3 - h], 0x5410u);
#pragma unroll
        for (int r = 0; r < RT_; ++r)
          mma(acc + 4 * (r * (BM / 8) + j), a[r][h][0], a[r][h][1], a[r][h][2], a[r][h][3], b0, b1);
      }
    }
  }
}
"""

_HEAD = r"""extern "C" __global__ void __launch_bounds__(THREADS, WG_MINB)
KERNEL_NAME(const u16* __restrict__ x, int ldx, const u8* __restrict__ w, const u8* __restrict__ s,
            const float* __restrict__ mul, int mul_stride, const u16* __restrict__ bias,
            u16* __restrict__ y, int ldy, int M, int N, int K, float* __restrict__ part,
            int* __restrict__ counters)
{
  extern __shared__ __align__(1024) unsigned char smem[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int m0 = blockIdx.x * BM, row0 = blockIdx.y * ROWS + warp * WARP_ROWS;
  const int splits = gridDim.z, z = blockIdx.z, chunks = K >> 7;
  const int c_lo = chunks * z / splits, c_hi = chunks * (z + 1) / splits, last = c_hi - 1;
  const u8* wp[2 * RT_];
  const u8* sp[2 * RT_];
#pragma unroll
  for (int i = 0; i < 2 * RT_; ++i) {  // rows g + 8i of the warp (clamped to N-1: computed, never stored)
    const int row = min(row0 + g + 8 * i, N - 1);
    wp[i] = w + (u64)row * (K >> 1) + t * 16;
    sp[i] = s + (u64)row * (K >> 4) + t * 2;
  }

"""

_LOOP = r"""
  // XST chunk stages in a ring: chunk cc+XST-1 is copied into the stage chunk cc-1 left, which every warp
  // finished reading before the barrier that ended chunk cc-1
  const u32 ring = smem_addr(smem);
  float acc[NF * 4];
#pragma unroll
  for (int i = 0; i < NF * 4; ++i) acc[i] = 0.f;
  Slot S[DEPTH + 1];
#pragma unroll
  for (int i = 0; i < DEPTH; ++i) load_slot(S[i], min(c_lo + i, last), wp, sp, nullptr);
#pragma unroll
  for (int i = 0; i < XST - 1; ++i) copy_x_chunk(ring + i * (BM * 256), x, ldx, m0, M, min(c_lo + i, last));
  wait_x_copies();
  __syncthreads();
  for (int c = c_lo; c < c_hi; c += UNROLL) {
#pragma unroll
    for (int i = 0; i < UNROLL; ++i) {
      const int cc = c + i, r = cc - c_lo;
      copy_x_chunk(ring + ((r + XST - 1) % XST) * (BM * 256), x, ldx, m0, M, min(cc + XST - 1, last));
      load_slot(S[(i + DEPTH) % (DEPTH + 1)], min(cc + DEPTH, last), wp, sp, nullptr);
      compute_tile(S[i % (DEPTH + 1)], acc, ring + (r % XST) * (BM * 256), g, t);
      wait_x_copies();  // chunk cc+1 (this thread's copies) ...
      __syncthreads();  // ... and everyone's; chunk cc's stage is free
      if (cc + 1 >= c_hi) break;
    }
  }
  asm volatile("cp.async.wait_all;" ::: "memory");  // no copy may land after the block has exited

"""

_EPILOGUE = r"""
  // acc[4f + e], fragment f < NF: weight row row0 + FROW(f) + g + 8 (e >> 1), token
  // m0 + FTOK(f) + 2t + (e & 1)
  const int wrow = row0 + g;
  if (splits > 1) {
    // split K: every split stores its partial sums; the last to arrive adds them in split order (its own
    // from registers), so the sum does not depend on which split arrives last, and stores y
#pragma unroll
    for (int i = 0; i < NF; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int m = m0 + FTOK(i) + 2 * t + (e & 1), n = wrow + FROW(i) + 8 * (e >> 1);
        if (m < M && n < N) part[((u64)z * M + m) * N + n] = acc[4 * i + e];
      }
    __threadfence();
    __syncthreads();
    __shared__ int arrived_last;
    const int tile = blockIdx.x + gridDim.x * blockIdx.y;
    if (threadIdx.x == 0) arrived_last = atomicAdd(&counters[tile], 1) == splits - 1;
    __syncthreads();
    if (!arrived_last) return;
    __threadfence();
#pragma unroll
    for (int i = 0; i < NF; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int m = m0 + FTOK(i) + 2 * t + (e & 1), n = wrow + FROW(i) + 8 * (e >> 1);
        if (m < M && n < N) {
          float sum = 0.0f;
          for (int o = 0; o < splits; ++o)
            sum += o == z ? acc[4 * i + e] : __ldcg(&part[((u64)o * M + m) * N + n]);
          acc[4 * i + e] = sum;
        }
      }
    if (threadIdx.x == 0) counters[tile] = 0;  // ready for the next call (graph replays reuse it)
  }
#pragma unroll
  for (int i = 0; i < NF; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int m = m0 + FTOK(i) + 2 * t + (e & 1), n = wrow + FROW(i) + 8 * (e >> 1);
      if (m >= M || n >= N) continue;
      float v = acc[4 * i + e] * mul[(u64)n * mul_stride] * 128.0f;
      if (bias) v += to_f32(bias[n]);
      u16 o;
      asm("cvt.rn." STYPE ".f32 %0, %1;" : "=h"(o) : "f"(v));
      y[(u64)m * ldy + n] = o;
    }
}
"""

#: Token rows per block (BM: multiple of 8, 8 to 256; BM * 16 a multiple of the block's threads), warpgroups
#: of 4 warps per block (WG), 16-row weight tiles per warp (RT), weight chunks in flight (DEPTH),
#: activation chunk stages in the copy ring (XST), blocks per SM for the register cap (WG_MINB).
VARIANT = {"BM": 32, "WG": 2, "RT": 1, "DEPTH": 2, "XST": 4, "WG_MINB": 1}
KERNEL_NAME = "nvfp4_mma_tile"
DTYPES = (torch.bfloat16, torch.float16)


def rows_per_block(variant: dict[str, int]) -> int:
    var = {**VARIANT, **variant}
    return 4 * var["WG"] * 16 * var["RT"]


def source(dtype: torch.dtype, variant: dict[str, int] | None = None) -> str:
    var = {**VARIANT, **(variant or {})}
    bm, wg, rt, depth = var["BM"], var["WG"], var["RT"], var["DEPTH"]
    if bm % 8 or not 8 <= bm <= 256:
        raise ValueError(f"cuda_tile: BM must be a multiple of 8 from 8 to 256, got {bm}")
    if (bm * 16) % (128 * wg):
        raise ValueError(f"cuda_tile: a block copies BM * 16 pieces with {128 * wg} threads; BM={bm}")
    defs = {
        **{k: v for k, v in var.items() if k != "RT"},  # cuda_mma's source defines RT (its Slot's row tiles)
        "RT_": rt,
        "THREADS": 128 * wg,
        "ROWS": rows_per_block(var),
        "WARP_ROWS": 16 * rt,
        "WARPS": 4 * wg,
        "UNROLL": depth + 1 if depth % 2 else 2 * (depth + 1),
        "NF": bm // 8 * rt,
        "KERNEL_NAME": KERNEL_NAME,
    }
    head = "".join(f"#define {k} {v}\n" for k, v in defs.items())
    head += f"#define FROW(f) (16 * ((f) / {bm // 8}))\n#define FTOK(f) (8 * ((f) % {bm // 8}))\n"
    body = _COMMON + _FUNCTIONS + _HEAD + _LOOP + _EPILOGUE
    return cuda_mma_src.source(dtype, 1, {"RT": rt, "XPRE": 0}) + head + body


def shared_bytes(variant: dict[str, int] | None = None) -> int:
    """Dynamic shared memory of one block: XST chunks of BM rows x 128 activations."""
    var = {**VARIANT, **(variant or {})}
    return var["XST"] * var["BM"] * 256


def arch(capability: tuple[int, int]) -> str:
    return f"sm_{capability[0]}{capability[1]}"
