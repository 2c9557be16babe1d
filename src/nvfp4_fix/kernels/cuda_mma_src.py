"""The CUDA C++ of cuda_mma (and, appended to it, of cuda_moe) and its compile-time knobs: the kernel
text, the defines per dtype, the default variant per column-tile count. ``kernels/cuda_mma.py`` says
what the kernel computes and launches it; nothing here needs a GPU.
"""

from __future__ import annotations

import torch

_SOURCE = r"""
typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;
typedef unsigned long long u64;
struct U4 { u32 x, y, z, w; };

__device__ __forceinline__ U4 ld_stream(const u8* p) {
  U4 r;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
  return r;
}
__device__ __forceinline__ U4 ld_x(const u16* p) {
  U4 r;
  asm volatile("ld.global.nc.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
  return r;
}
__device__ __forceinline__ u32 ld_u16(const u8* p) {
  u16 r;
  asm volatile("ld.global.nc.u16 %0, [%1];" : "=h"(r) : "l"(p));
  return r;
}
__device__ __forceinline__ u32 prmt(u32 a, u32 b, u32 sel) {
  u32 d;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(sel));
  return d;
}
// Top nibble of each 16-bit half -> 16-bit float bits of the E2M1 value * 2^-126 (bf16) / 2^-14 (fp16).
__device__ __forceinline__ u32 dec(u32 u) {
  return (u & 0x80008000u) | ((u & 0x70007000u) >> SHIFT);
}
__device__ __forceinline__ u32 scl(u32 a, u32 s) {
  u32 d;
  asm("fma.rn." HTYPE " %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(s), "r"(0x80008000u));
  return d;
}
// e4m3 byte -> the pair (s, s) of its value * 2^119 (bf16) / 2^7 (fp16).
__device__ __forceinline__ u32 scale_pair(u32 b) {
  float f;  // value * 2^-120, subnormals too
  asm("mov.b32 %0, %1;" : "=f"(f) : "r"(((b & 0x7Fu) << 20) | ((b & 0x80u) << 24)));
  f = f * 0x1p120f * SCALE_POW;
  u32 d;
  asm("cvt.rn." HTYPE ".f32 %0, %1, %1;" : "=r"(d) : "f"(f));
  return d;
}
// Two e4m3 bytes (low, high) -> the pairs (s0, s0) and (s1, s1), scaled as scale_pair does.
__device__ __forceinline__ void scale_pairs(u32 b2, u32& p0, u32& p1) {
#if __CUDA_ARCH__ >= 890
  u32 h;  // exact: every e4m3 value is a normal or subnormal fp16
  asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(h) : "h"((u16)b2));
#if IS_BF16
  float f0, f1;
  asm("{.reg .f16 lo, hi; mov.b32 {lo, hi}, %2; cvt.f32.f16 %0, lo; cvt.f32.f16 %1, hi;}"
      : "=f"(f0), "=f"(f1) : "r"(h));
  f0 *= 0x1p119f;
  f1 *= 0x1p119f;
  asm("cvt.rn.bf16x2.f32 %0, %1, %1;" : "=r"(p0) : "f"(f0));
  asm("cvt.rn.bf16x2.f32 %0, %1, %1;" : "=r"(p1) : "f"(f1));
#else
  asm("mul.rn.f16x2 %0, %0, %1;" : "+r"(h) : "r"(0x58005800u));  // * 2^7, exact (<= 57344)
  p0 = prmt(h, h, 0x1010u);
  p1 = prmt(h, h, 0x3232u);
#endif
#else
  p0 = scale_pair(b2 & 0xFFu);
  p1 = scale_pair((b2 >> 8) & 0xFFu);
#endif
}

__device__ __forceinline__ void mma(float* c, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32." MTYPE "." MTYPE ".f32 "
               "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
__device__ __forceinline__ float to_f32(u16 h) {
  float f;
#if IS_BF16
  asm("mov.b32 %0, %1;" : "=f"(f) : "r"((u32)h << 16));
#else
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
#endif
  return f;
}

// One 128-wide K chunk of a lane: for each of its RT row tiles, 16 bytes of codes of rows g and
// g+8 and their two block scales each; with XPRE also the 32 activations of each token row 8j+g.
struct Slot {
  u32 q[RT][2][4]; u32 s[RT][2];
#if XPRE
  u32 X[NT][16];
#endif
};

__device__ __forceinline__ void load_x(u32 (*X)[16], int c, const u16* const* xr) {
#pragma unroll
  for (int j = 0; j < NT; ++j) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const U4 v = ld_x(xr[j] + c * 128 + i * 8);
      X[j][4 * i] = v.x; X[j][4 * i + 1] = v.y; X[j][4 * i + 2] = v.z; X[j][4 * i + 3] = v.w;
    }
  }
}

__device__ __forceinline__ void load_slot(Slot& S, int c, const u8* const* wp, const u8* const* sp,
                                          const u16* const* xr) {
#pragma unroll
  for (int r = 0; r < RT; ++r) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const U4 v = ld_stream(wp[2 * r + e] + c * 64);
      S.q[r][e][0] = v.x; S.q[r][e][1] = v.y; S.q[r][e][2] = v.z; S.q[r][e][3] = v.w;
      S.s[r][e] = ld_u16(sp[2 * r + e] + c * 8);
    }
  }
#if XPRE
  load_x(S.X, c, xr);
#endif
}

__device__ __forceinline__ void compute(const Slot& S, float (*acc)[RT][NT][4], int c, const u16* const* xr) {
#if LOADONLY
  u32 v = 0;
#pragma unroll
  for (int r = 0; r < RT; ++r)
#pragma unroll
    for (int e = 0; e < 8; ++e) v ^= S.q[r][e >> 2][e & 3] ^ S.s[r][e >> 2];
  float f;
  asm("mov.b32 %0, %1;" : "=f"(f) : "r"(v & 0x3FFFFFFFu));
  acc[0][0][0][0] += f;
  return;
#endif
  u32 sc[RT][2][2];  // [tile][row g / g+8][first / second block]
#pragma unroll
  for (int r = 0; r < RT; ++r) {
    scale_pairs(S.s[r][0], sc[r][0][0], sc[r][0][1]);
    scale_pairs(S.s[r][1], sc[r][1][0], sc[r][1][1]);
  }
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    // the 8 activations of each token row for this quarter of the chunk: loaded ahead with the
    // weights (XPRE) or here, 4 words per row (fewer live registers for many rows)
#if XPRE
#define XW(j, i) S.X[j][4 * q + (i)]
#else
    u32 Xq[NT][4];
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      const U4 v = ld_x(xr[j] + c * 128 + q * 8);
      Xq[j][0] = v.x; Xq[j][1] = v.y; Xq[j][2] = v.z; Xq[j][3] = v.w;
    }
#define XW(j, i) Xq[j][i]
#endif
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      u32 b0[NT], b1[NT];
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        const u32 lo = XW(j, 1 - h), hi = XW(j, 3 - h);
        b0[j] = prmt(lo, hi, 0x7632u);
        b1[j] = prmt(lo, hi, 0x5410u);
      }
#undef XW
#pragma unroll
      for (int r = 0; r < RT; ++r) {
        const u32 sa = sc[r][0][q >> 1], sb = sc[r][1][q >> 1];
        const u32 wa = S.q[r][0][q], wb = S.q[r][1][q];
        const u32 a0 = scl(dec(wa << (8 * h)), sa);
        const u32 a2 = scl(dec(wa << (8 * h + 4)), sa);
        const u32 a1 = scl(dec(wb << (8 * h)), sb);
        const u32 a3 = scl(dec(wb << (8 * h + 4)), sb);
#pragma unroll
        for (int j = 0; j < NT; ++j) mma(acc[q % QA][r][j], a0, a1, a2, a3, b0[j], b1[j]);
      }
    }
  }
}

// The K loop of one warp over chunks [c_lo, c_hi): DEPTH chunks in flight ahead of the one being
// computed, DEPTH + 1 slots in rotation, unrolled so that no registers move between slots; past the end
// the last chunk is reloaded (cached, never used) so the loads need no branches.
__device__ __forceinline__ void mainloop(float (*acc)[RT][NT][4], const u8* const* wp, const u8* const* sp,
                                         const u16* const* xr, int c_lo, int c_hi) {
  const int last = c_hi - 1;
  Slot S[DEPTH + 1];
  if (c_lo < c_hi) {
#pragma unroll
    for (int i = 0; i < DEPTH; ++i) load_slot(S[i], min(c_lo + i, last), wp, sp, xr);
  }
  for (int c = c_lo; c < c_hi; c += DEPTH + 1) {
#pragma unroll
    for (int i = 0; i <= DEPTH; ++i) {
      load_slot(S[(i + DEPTH) % (DEPTH + 1)], min(c + i + DEPTH, last), wp, sp, xr);
      compute(S[i], acc, c + i, xr);
      if (c + i + 1 >= c_hi) break;
    }
  }
}

// [K group of warps][token column][row of the block: WN warps' 16 * RT rows side by side]
#if RED_SHARED
typedef float Partials[NT * 8][16 * RT * WN];  // warps add into one tile (too little shared memory for 8)
#else
typedef float Partials[8 / WN][NT * 8][16 * RT * WN];
#endif

__device__ __forceinline__ void clear_partials(Partials& red) {
#if RED_SHARED
  for (int i = threadIdx.x; i < NT * 8 * 16 * RT * WN; i += blockDim.x) (&red[0][0])[i] = 0.f;
  __syncthreads();
#endif
}

// Each warp's sums into shared memory at its K group ``kg`` and first row ``r0`` of the block; read
// back with sum_partials after __syncthreads.
__device__ __forceinline__ void store_partials(Partials& red, float (*acc)[RT][NT][4], int kg, int r0,
                                               int g, int t) {
#pragma unroll
  for (int r = 0; r < RT; ++r) {
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      float v[4] = {};
#pragma unroll
      for (int a = 0; a < QA; ++a)
#pragma unroll
        for (int e = 0; e < 4; ++e) v[e] += acc[a][r][j][e];
      const int rr = r0 + 16 * r + g;
#if RED_SHARED
      atomicAdd(&red[8 * j + 2 * t][rr], v[0]);
      atomicAdd(&red[8 * j + 2 * t + 1][rr], v[1]);
      atomicAdd(&red[8 * j + 2 * t][rr + 8], v[2]);
      atomicAdd(&red[8 * j + 2 * t + 1][rr + 8], v[3]);
#else
      red[kg][8 * j + 2 * t][rr] = v[0];
      red[kg][8 * j + 2 * t + 1][rr] = v[1];
      red[kg][8 * j + 2 * t][rr + 8] = v[2];
      red[kg][8 * j + 2 * t + 1][rr + 8] = v[3];
#endif
    }
  }
}

__device__ __forceinline__ float sum_partials(const Partials& red, int k_groups, int m, int rr) {
#if RED_SHARED
  return red[m][rr];
#else
  float v = 0.f;
  for (int k = 0; k < k_groups; ++k) v += red[k][m][rr];
  return v;
#endif
}

extern "C" __global__ void __launch_bounds__(256, MINB)
nvfp4_mma(const u16* __restrict__ x, int ldx, const u8* __restrict__ w, const u8* __restrict__ s,
          const float* __restrict__ mul, int mul_stride, const u16* __restrict__ bias,
          u16* __restrict__ y, int ldy, int M, int N, int K)
{
  __shared__ Partials red;
  clear_partials(red);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  // WN warps side by side over N share each activation chunk (L1); the warps / WN groups split K
  const int wn = warp % WN, kg = warp / WN, k_groups = warps / WN;
  const int rows = 16 * RT * WN, block0 = blockIdx.x * rows, row0 = block0 + wn * 16 * RT;
  const int chunks = K >> 7;
  const u8* wp[2 * RT];
  const u8* sp[2 * RT];
#pragma unroll
  for (int i = 0; i < 2 * RT; ++i) {  // rows g, g+8, g+16, g+24 of the warp (clamped to N-1)
    const int row = min(row0 + g + 8 * i, N - 1);
    wp[i] = w + (u64)row * (K >> 1) + t * 16;
    sp[i] = s + (u64)row * (K >> 4) + t * 2;
  }
  const u16* xr[NT];
  // Token rows past M repeat row M-1: their output columns are computed and never stored.
#pragma unroll
  for (int j = 0; j < NT; ++j) xr[j] = x + (u64)min(8 * j + g, M - 1) * ldx + t * 32;
  float acc[QA][RT][NT][4] = {};
  mainloop(acc, wp, sp, xr, chunks * kg / k_groups, chunks * (kg + 1) / k_groups);
  store_partials(red, acc, kg, wn * 16 * RT, g, t);
  __syncthreads();
  for (int i = threadIdx.x; i < M * rows; i += blockDim.x) {
    const int m = i / rows, rr = i % rows, n = block0 + rr;
    if (n >= N) continue;
    float v = sum_partials(red, k_groups, m, rr) * mul[(u64)n * mul_stride] * 128.0f;
    if (bias) v += to_f32(bias[n]);
    u16 o;
    asm("cvt.rn." STYPE ".f32 %0, %1;" : "=h"(o) : "f"(v));
    y[(u64)m * ldy + n] = o;
  }
}
"""

_DEFINES = {
    torch.bfloat16: {
        "IS_BF16": "1",
        "SHIFT": "6",
        "HTYPE": '"bf16x2"',
        "STYPE": '"bf16"',
        "MTYPE": '"bf16"',
        "SCALE_POW": "0x1p119f",
    },
    torch.float16: {
        "IS_BF16": "0",
        "SHIFT": "3",
        "HTYPE": '"f16x2"',
        "STYPE": '"f16"',
        "MTYPE": '"f16"',
        "SCALE_POW": "0x1p7f",
    },
}


#: Chunks of loads in flight per warp (DEPTH), whether activations are loaded ahead with the weights
#: (XPRE=1) or when used (0, fewer registers: x is small and hits L1), 16-row tiles per warp (RT),
#: the blocks per SM the registers are capped for (MINB), and the warps of a block side by side over N
#: (WN: they share each activation chunk through L1; the rest of the block's warps split K).
VARIANT = {"DEPTH": 2, "XPRE": 1, "LOADONLY": 0, "RT": 1, "MINB": 2, "WN": 1}
#: From 9 token rows (NT >= 2 column tiles) the activations of every row no longer fit beside the
#: weights (XPRE=1 spills at NT = 2): loaded when used; from 17 (NT >= 3) with registers for one block
#: per SM. Spill-free for sm_80 and sm_90 (tests/test_cuda_mma_compile.py).
VARIANT_TWO_TILES = {"DEPTH": 2, "XPRE": 0, "LOADONLY": 0, "RT": 1, "MINB": 2, "WN": 1}
VARIANT_MANY_ROWS = {"DEPTH": 2, "XPRE": 0, "LOADONLY": 0, "RT": 1, "MINB": 1, "WN": 1}


def default_variant(nt: int) -> dict[str, int]:
    return VARIANT if nt == 1 else VARIANT_TWO_TILES if nt == 2 else VARIANT_MANY_ROWS


def source(dtype: torch.dtype, nt: int, variant: dict[str, int] | None = None) -> str:
    var = {**default_variant(nt), **(variant or {})}
    derived = {
        # independent accumulators per mma column: 4 (one per quarter chunk) while few columns
        # would otherwise chain on one accumulator
        "QA": 4 if nt * var["RT"] <= 2 else 1,
        # 8 warps' partial tiles fit 32 KiB of shared memory up to NT * RT = 8; beyond, warps add
        # into one tile
        "RED_SHARED": int(nt * var["RT"] > 8),
    }
    defs = {**_DEFINES[dtype], "NT": str(nt), **{k: str(v) for k, v in {**var, **derived}.items()}}
    return "".join(f"#define {k} {v}\n" for k, v in defs.items()) + _SOURCE


#: The activation dtypes the kernel is compiled for.
DTYPES = tuple(_DEFINES)
