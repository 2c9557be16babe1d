"""The mma.sync kernel of cuda_wgmma (KIND 1, sm_80+): its device functions and main loop, spliced by
``cuda_wgmma_src.source`` between the shared kernel head and split-K epilogue.

The block's activations of a chunk keep their natural layout (BM rows x 256 bytes) in a ring of XST chunks
that ``cp.async`` fills XST - 1 chunks ahead; mma.sync reads shared memory through registers, so no proxy
fence is needed (the suspected cost of the wgmma kernel, benchmarks/RESULTS-kernels-wgmma.md). Warps sit side
by side over N with RT tiles of 16 weight rows each, decoded as cuda_mma decodes them.
"""

from __future__ import annotations

FUNCTIONS = r"""
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

LOOP = r"""
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
