"""The CUDA C++ of cuda_wgmma (sm_90a): a GEMM for 9 to a few hundred token rows in which the decoded
NVFP4 weights are wgmma's register A operand and the activations its shared-memory B operand; and the
kernel head and split-K epilogue it shares with the mma.sync kernel (KIND 1, ``cuda_tile_src.py``).
``kernels/cuda_wgmma.py`` launches both; nothing here needs a GPU.

It is appended to cuda_mma's source (one RT = 1 warp's weight loads and decode, ``load_slot``,
``scale_pairs``, ``dec``, ``scl``), so a warp holds its 16 weight rows exactly as cuda_mma does, and its
decoded fragments for one 128-wide K chunk are the A fragments of eight ``wgmma.m64nBMk16`` (a
warpgroup's four warps are the 64 rows). The k order inside a chunk is cuda_mma's permutation, so the
activations are written to shared memory in that order: per 16-deep step, two core matrices
(8 tokens x 16 bytes each) per 8 tokens, no swizzle; lane (token, quarter q) turns the 32 activations
it loaded (4 x 16 bytes) into the four 16-byte core-matrix rows of steps 2q and 2q + 1.
"""

from __future__ import annotations

import torch

from . import cuda_mma_src, cuda_tile_src

_COMMON = r"""
__device__ __forceinline__ u32 smem_addr(const void* p) {
  u32 a;
  asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
  return a;
}
"""

_STORE_WGMMA = r"""__device__ __forceinline__ void st_shared4(u32 a, u32 x, u32 y, u32 z, u32 w) {
  asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};"
               :: "r"(a), "r"(x), "r"(y), "r"(z), "r"(w) : "memory");
}
__device__ __forceinline__ u64 smem_desc(u32 addr) {
  // no swizzle; bits 16-29: byte offset between core matrices adjacent in K, 32-45: adjacent in N
  return (u64)((addr & 0x3FFFFu) >> 4) | ((u64)(DESC_LBO >> 4) << 16) | ((u64)(DESC_SBO >> 4) << 32);
}

// the 32 activations (4 x 8) of token row `xr` that one lane turns into core-matrix rows
struct XUnit { u32 v[4][4]; };

__device__ __forceinline__ void load_xunit(XUnit& u, const u16* xr, int c) {
#pragma unroll
  for (int t = 0; t < 4; ++t) {
    const U4 v = ld_x(xr + c * 128 + t * 32);
    u.v[t][0] = v.x; u.v[t][1] = v.y; u.v[t][2] = v.z; u.v[t][3] = v.w;
  }
}

// Step s = 2q + h, half cc (k 0-7 / 8-15 of the step) of token n lies at
// s * BM * 32 + (n / 8) * 256 + cc * 128 + (n % 8) * 16: the pairs (3-2h, 7-2h) and (2-2h, 6-2h) of
// each 8 activations, as cuda_mma's B fragments b0 / b1 are built.
__device__ __forceinline__ void store_xunit(const XUnit& u, u32 buf, int n, int q) {
  const u32 row = buf + (n >> 3) * 256 + (n & 7) * 16;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const u32 a = row + (2 * q + h) * (BM * 32);
#define PAIR(t, sel) prmt(u.v[t][1 - h], u.v[t][3 - h], sel)
    st_shared4(a, PAIR(0, 0x7632u), PAIR(1, 0x7632u), PAIR(2, 0x7632u), PAIR(3, 0x7632u));
    st_shared4(a + 128, PAIR(0, 0x5410u), PAIR(1, 0x5410u), PAIR(2, 0x5410u), PAIR(3, 0x5410u));
#undef PAIR
  }
}

"""

_XREGS = r"""
// A lane's share of the activations of one chunk: XU units of (token, quarter), 8 tokens a warp pass.
struct XRegs { XUnit u[XU]; };

// (fewer groups of 8 tokens than warps: the warps past BM / 8 load and store none)
__device__ __forceinline__ void load_x_chunk(XRegs& X, const u16* const* xr, int c, int warp) {
#pragma unroll
  for (int i = 0; i < XU; ++i)
    if (warp + i * WARPS < BM / 8) load_xunit(X.u[i], xr[i], c);
}
__device__ __forceinline__ void store_x_chunk(const XRegs& X, u32 buf, int warp, int lane) {
#pragma unroll
  for (int i = 0; i < XU; ++i)
    if (warp + i * WARPS < BM / 8) store_xunit(X.u[i], buf, (warp + i * WARPS) * 8 + (lane & 7), lane >> 3);
}

"""

_WGMMA = r"""__device__ __forceinline__ void decode_chunk(const Slot& S, u32 (*A)[4]) {
  u32 sc[2][2];
  scale_pairs(S.s[0][0], sc[0][0], sc[0][1]);
  scale_pairs(S.s[0][1], sc[1][0], sc[1][1]);
#pragma unroll
  for (int q = 0; q < 4; ++q)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const u32 wa = S.q[0][0][q], wb = S.q[0][1][q];
      A[2 * q + h][0] = scl(dec(wa << (8 * h)), sc[0][q >> 1]);
      A[2 * q + h][1] = scl(dec(wb << (8 * h)), sc[1][q >> 1]);
      A[2 * q + h][2] = scl(dec(wa << (8 * h + 4)), sc[0][q >> 1]);
      A[2 * q + h][3] = scl(dec(wb << (8 * h + 4)), sc[1][q >> 1]);
    }
}

__device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wg_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wg_wait0() { asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory"); }

WGMMA_STEP

// Pins registers at this point of the program: the compiler may not compute them later (a decode
// instruction moved between a stage's wgmma would make ptxas serialize them) nor read them earlier.
__device__ __forceinline__ void pin_a(u32 (*A)[4]) {
#pragma unroll
  for (int s = 0; s < 8; ++s)
#pragma unroll
    for (int j = 0; j < 4; ++j) asm volatile("" : "+r"(A[s][j]) :: "memory");
}
__device__ __forceinline__ void pin_acc(float* acc) {
#pragma unroll
  for (int i = 0; i < BM / 2; ++i) asm volatile("" : "+f"(acc[i]) :: "memory");
}

// The chunk's eight 16-deep steps: A from registers, B = the step's tile of the buffer at `buf`.
__device__ __forceinline__ void mma_chunk(float* acc, u32 (*A)[4], u32 buf) {
  pin_a(A);
  pin_acc(acc);
  wg_fence();
#pragma unroll
  for (int s = 0; s < 8; ++s) wgmma_step(acc, A[s], smem_desc(buf + s * (BM * 32)));
  wg_commit();
  pin_acc(acc);
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
#if KIND == 0
  const u16* xr[XU];  // token rows past M repeat row M-1 (computed, never stored)
#pragma unroll
  for (int i = 0; i < XU; ++i)
    xr[i] = x + (u64)min(m0 + (warp + i * WARPS) * 8 + (lane & 7), M - 1) * ldx + (lane >> 3) * 8;
#endif

"""

_LOOP_WGMMA = r"""
  // three chunk buffers in rotation: chunk cc+1 is written during chunk cc into the buffer chunk cc-2
  // used, which every warpgroup waited for before the last barrier (two would race a warpgroup whose
  // chunk cc-1 still runs)
  u32 cur = smem_addr(smem), nxt = cur + BM * 256, spare = nxt + BM * 256;
  float acc[BM / 2];
#pragma unroll
  for (int i = 0; i < BM / 2; ++i) acc[i] = 0.f;
  u32 A[8][4];
  Slot S[DEPTH + 1];
  // chunk j (counted from c_lo) arrives in X[j & 1], loaded two chunks before it is stored: an L2
  // round trip under the weights' traffic is about one chunk's time
  XRegs X[2];
#pragma unroll
  for (int i = 0; i < DEPTH; ++i) load_slot(S[i], min(c_lo + i, last), wp, sp, nullptr);
  load_x_chunk(X[0], xr, c_lo, warp);
  store_x_chunk(X[0], cur, warp, lane);
  load_x_chunk(X[1], xr, min(c_lo + 1, last), warp);
  load_x_chunk(X[0], xr, min(c_lo + 2, last), warp);
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
  __syncthreads();
  // unrolled UNROLL = lcm(DEPTH + 1, 2) chunks at a time, so that slot and X indices are constants
  for (int c = c_lo; c < c_hi; c += UNROLL) {
#pragma unroll
    for (int i = 0; i < UNROLL; ++i) {
      const int cc = c + i;
#if !LATE_LOADS
      load_slot(S[(i + DEPTH) % (DEPTH + 1)], min(cc + DEPTH, last), wp, sp, nullptr);
#endif
      wg_wait0();  // this warpgroup's chunk cc-1 is done: A is free
      pin_acc(acc);
      decode_chunk(S[i % (DEPTH + 1)], A);
#if WGMMA_OFF  // timing diagnostic: no tensor work (wrong results)
      acc[0] += __uint_as_float(A[0][0] ^ A[7][3]);
#else
      mma_chunk(acc, A, cur);
#endif
      store_x_chunk(X[(i + 1) & 1], nxt, warp, lane);
#if !LATE_LOADS
      load_x_chunk(X[(i + 1) & 1], xr, min(cc + 3, last), warp);
#endif
#if PROXY_FENCE  // 0 only as a timing diagnostic: wgmma may then read stale activations
      asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
#endif
      __syncthreads();
#if LATE_LOADS  // the global loads issued after the fences instead of before them
      load_slot(S[(i + DEPTH) % (DEPTH + 1)], min(cc + DEPTH, last), wp, sp, nullptr);
      load_x_chunk(X[(i + 1) & 1], xr, min(cc + 3, last), warp);
#endif
      const u32 done = cur;
      cur = nxt;
      nxt = spare;
      spare = done;
      if (cc + 1 >= c_hi) break;
    }
  }
  wg_wait0();
  pin_acc(acc);

"""


_EPILOGUE = r"""
  // acc[4f + e], fragment f < NF: weight row row0 + FROW(f) + g + 8 (e >> 1), token
  // m0 + FTOK(f) + 2t + (e & 1)
  const int wrow = row0 + g;
  if (splits > 1) {
    // split K: every split stores its partial sums; the last to arrive adds the others' and stores y
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
        if (m < M && n < N)
          for (int o = 0; o < splits; ++o)
            if (o != z) acc[4 * i + e] += __ldcg(&part[((u64)o * M + m) * N + n]);
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


def _wgmma_step(bm: int, mtype: str) -> str:
    """``wgmma_step``: one m64n{bm}k16 wgmma, its bm / 2 accumulators per thread spelled out."""
    n_acc = bm // 2
    d = ", ".join(f"%{i}" for i in range(n_acc))
    a = ", ".join(f"%{n_acc + i}" for i in range(4))
    outs = ", ".join(f'"+f"(d[{i}])' for i in range(n_acc))
    return (
        "__device__ __forceinline__ void wgmma_step(float* d, const u32* a, u64 desc) {\n"
        f'  asm volatile("wgmma.mma_async.sync.aligned.m64n{bm}k16.f32.{mtype}.{mtype} '
        f'{{{d}}}, {{{a}}}, %{n_acc + 4}, 1, 1, 1, 0;"\n'
        f'      : {outs}\n      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc) : "memory");\n'
        "}\n"
    )


#: KIND 0: wgmma (sm_90a); KIND 1: mma.sync tiles (sm_80+), whose shared memory needs no proxy fence.
#: Token rows per block (BM: wgmma's N, 8 to 256 in steps of 8), warpgroups per block (WG: 4 warps each;
#: wgmma: 64 weight rows a warpgroup; mma.sync: 16 * RT rows a warp), weight chunks in flight (DEPTH),
#: activation chunks in the mma.sync kernel's copy ring (XST), blocks per SM for the register cap (WG_MINB),
#: and the wgmma descriptor's two byte offsets (LBO: core matrices
#: adjacent in K, SBO: adjacent in N).
VARIANT = {"KIND": 0, "BM": 64, "WG": 2, "RT": 1, "DEPTH": 2, "XST": 4, "WG_MINB": 1}
VARIANT |= {"DESC_LBO": 128, "DESC_SBO": 256}
#: Timing diagnostics of the wgmma kernel (benchmarks/sweep_wgmma.py --diag), never launched by the dispatch:
#: LATE_LOADS issues the next chunk's global loads after the per-chunk fences, PROXY_FENCE=0 drops the
#: shared-memory proxy fence (wgmma may read stale activations), WGMMA_OFF=1 drops the tensor work.
DIAGNOSTIC = {"LATE_LOADS": 0, "PROXY_FENCE": 1, "WGMMA_OFF": 0}

_MTYPE = {torch.bfloat16: "bf16", torch.float16: "f16"}


def rows_per_block(variant: dict[str, int]) -> int:
    var = {**VARIANT, **variant}
    return 64 * var["WG"] if var["KIND"] == 0 else 4 * var["WG"] * 16 * var["RT"]


def kernel_name(variant: dict[str, int]) -> str:
    return "nvfp4_wgmma" if {**VARIANT, **variant}["KIND"] == 0 else "nvfp4_mma_tile"


def source(dtype: torch.dtype, variant: dict[str, int] | None = None) -> str:
    var = {**VARIANT, **(variant or {})}
    bm, wg, kind = var["BM"], var["WG"], var["KIND"]
    if bm % 8 or not 8 <= bm <= 256:
        raise ValueError(f"cuda_wgmma: BM must be a multiple of 8 from 8 to 256, got {bm}")
    if kind == 1 and (bm * 16) % (128 * wg):
        raise ValueError(
            f"cuda_wgmma: the mma.sync kernel copies BM * 16 pieces with {128 * wg} threads; BM={bm}"
        )
    rt = 1 if kind == 0 else var["RT"]
    depth = var["DEPTH"]
    defs = {
        **DIAGNOSTIC,
        **var,
        "RT_": rt,
        "THREADS": 128 * wg,
        "ROWS": rows_per_block(var),
        "WARP_ROWS": 16 * rt,
        "WARPS": 4 * wg,
        "XU": -(-bm // (32 * wg)),
        "UNROLL": depth + 1 if depth % 2 else 2 * (depth + 1),
        "NF": bm // 8 * rt,
        "KERNEL_NAME": kernel_name(var),
    }
    defs.pop("RT")  # cuda_mma's source defines RT (its Slot's row tiles), here RT_
    head = "".join(f"#define {k} {v}\n" for k, v in defs.items())
    if kind == 0:
        head += "#define FROW(f) 0\n#define FTOK(f) (8 * (f))\n"
        parts = [_COMMON, _STORE_WGMMA, _XREGS, _WGMMA.replace("WGMMA_STEP", _wgmma_step(bm, _MTYPE[dtype]))]
        parts += [_HEAD, _LOOP_WGMMA, _EPILOGUE]
    else:
        head += f"#define FROW(f) (16 * ((f) / {bm // 8}))\n#define FTOK(f) (8 * ((f) % {bm // 8}))\n"
        parts = [_COMMON, cuda_tile_src.FUNCTIONS, _HEAD, cuda_tile_src.LOOP, _EPILOGUE]
    return cuda_mma_src.source(dtype, 1, {"RT": rt, "XPRE": 0}) + head + "".join(parts)


def shared_bytes(variant: dict[str, int] | None = None) -> int:
    """Dynamic shared memory of one block: 3 (wgmma) or XST (mma.sync) chunks of BM rows x 128 activations."""
    var = {**VARIANT, **(variant or {})}
    return (3 if var["KIND"] == 0 else var["XST"]) * var["BM"] * 256


def arch(variant: dict[str, int], capability: tuple[int, int]) -> str:
    """wgmma needs the sm_90a target; the mma.sync kernel compiles for the card's own architecture."""
    return "sm_90a" if {**VARIANT, **variant}["KIND"] == 0 else f"sm_{capability[0]}{capability[1]}"


#: sm_90a: wgmma exists only on the "a" target of Hopper
ARCH = "sm_90a"
DTYPES = tuple(_MTYPE)
