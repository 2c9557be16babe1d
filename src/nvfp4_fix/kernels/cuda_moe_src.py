"""The CUDA C++ of cuda_moe's kernels, appended to cuda_mma's (its K loop, tiles and reduction):
``kernels/cuda_moe.py`` says what each computes and launches them; nothing here needs a GPU.
"""

SOURCE = r"""
__device__ __forceinline__ long long pair_expert(const void* ids, int ids64, long long st, long long sk,
                                                 int p, int topk) {
  const int t = p / topk, j = p - t * topk;
  const long long off = (long long)t * st + (long long)j * sk;
  return ids64 ? ((const long long*)ids)[off] : (long long)((const int*)ids)[off];
}
__device__ __forceinline__ float routing_weight(const void* rw, int kind, long long st, long long sk,
                                                int p, int topk) {
  const int t = p / topk, j = p - t * topk;
  const long long off = (long long)t * st + (long long)j * sk;
  if (kind == 0) return ((const float*)rw)[off];
  const u16 h = ((const u16*)rw)[off];
  float f;
  if (kind == 1) {
    asm("mov.b32 %0, %1;" : "=f"(f) : "r"((u32)h << 16));  // bf16
  } else {
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));  // fp16
  }
  return f;
}

// RT == 2: tile 0 = gate rows n0..n0+15, tile 1 = the same rows of up (I rows further). Only the
// GATE_UP_VARIANT module has it (the down module's RT = 1 Partials hold no up rows).
#if RT == 2
// acc += rows n0 .. n0 + 15 (clamped to I - 1) of expert e's gate (tile 0) and up (tile 1, I rows
// further) projections [2I, H] times the activation row ``x_row``, over the K chunks [c_lo, c_hi)
__device__ __forceinline__ void gate_up_rows(float (*acc)[RT][NT][4], const u8* w, const u8* s, long long e,
                                             long long w_se, long long s_se, const u16* x_row, int n0,
                                             int g, int t, int I, int H, int c_lo, int c_hi) {
  const u8* wb = w + e * w_se;
  const u8* sb = s + e * s_se;
  const u8* wp[4];
  const u8* sp[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {  // gate rows g, g+8; up rows g, g+8
    const int row = min(n0 + g + 8 * (i & 1), I - 1) + (i >> 1) * I;
    wp[i] = wb + (u64)row * (H >> 1) + t * 16;
    sp[i] = sb + (u64)row * (H >> 4) + t * 2;
  }
  const u16* xr[1] = {x_row + t * 32};
  mainloop(acc, wp, sp, xr, c_lo, c_hi);
}

// silu(gate) * up, computed in fp32 and rounded once to x's dtype
__device__ __forceinline__ void store_act(u16* out, float gate, float up) {
  const float a = gate / (1.0f + expf(-gate)) * up;
  u16 o;
  asm("cvt.rn." STYPE ".f32 %0, %1;" : "=h"(o) : "f"(a));
  *out = o;
}

extern "C" __global__ void __launch_bounds__(256, MINB)
nvfp4_moe_gate_up(const u16* __restrict__ x, int ldx, const u8* __restrict__ w, const u8* __restrict__ s,
                  long long w_se, long long s_se, const float* __restrict__ mul, int mul_se,
                  const void* __restrict__ ids, int ids64, long long id_st, long long id_sk, int topk, int E,
                  u16* __restrict__ act, int ld_act, int I, int H)
{
  const int p = blockIdx.y;
  const long long e = pair_expert(ids, ids64, id_st, id_sk, p, topk);
  if (e < 0 || e >= E) return;  // the whole block, before any barrier
  __shared__ Partials red;
  clear_partials(red);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int n0 = blockIdx.x * 16;
  const int chunks = H >> 7;
  float acc[QA][RT][NT][4] = {};
  gate_up_rows(acc, w, s, e, w_se, s_se, x + (u64)(p / topk) * ldx, n0, g, t, I, H, chunks * warp / warps,
               chunks * (warp + 1) / warps);
  store_partials(red, acc, warp, 0, g, t);
  __syncthreads();
  if (threadIdx.x < 16 && n0 + threadIdx.x < I) {
    const int i = threadIdx.x;
    store_act(act + (u64)p * ld_act + n0 + i, sum_partials(red, warps, 0, i) * mul[e * mul_se] * 128.0f,
              sum_partials(red, warps, 0, 16 + i) * mul[e * mul_se + 1] * 128.0f);
  }
}

// The same for pairs sorted by expert (kernels/moe_route.route with block_m = 8): block y holds up to
// 8 pairs of expert block_expert[y], one per token column of the MMA (lane column g reads the x row of
// pair slot g), so the expert's weights are read once for all 8. Padding slots (id >= num_pairs) repeat
// slot 0's row and are not stored; blocks of an expert outside [0, E) return at once.
extern "C" __global__ void __launch_bounds__(256, MINB)
nvfp4_moe_gate_up_sorted(const u16* __restrict__ x, int ldx, const u8* __restrict__ w,
                         const u8* __restrict__ s, long long w_se, long long s_se,
                         const float* __restrict__ mul, int mul_se,
                         const int* __restrict__ pairs, const int* __restrict__ block_expert, int num_pairs,
                         int topk, int E, u16* __restrict__ act, int ld_act, int I, int H)
{
  const int b = blockIdx.y;
  const long long e = block_expert[b];
  if (e < 0 || e >= E) return;
  __shared__ Partials red;
  clear_partials(red);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int n0 = blockIdx.x * 16;
  const int chunks = H >> 7;
  const int pg = pairs[b * 8 + g];
  const int prow = pg < num_pairs ? pg : pairs[b * 8];
  float acc[QA][RT][NT][4] = {};
  gate_up_rows(acc, w, s, e, w_se, s_se, x + (u64)(prow / topk) * ldx, n0, g, t, I, H,
               chunks * warp / warps, chunks * (warp + 1) / warps);
  store_partials(red, acc, warp, 0, g, t);
  __syncthreads();
  const float mg = mul[e * mul_se] * 128.0f, mu = mul[e * mul_se + 1] * 128.0f;
  for (int idx = threadIdx.x; idx < 8 * 16; idx += blockDim.x) {
    const int m = idx >> 4, i = idx & 15;
    const int p = pairs[b * 8 + m];
    if (p >= num_pairs || n0 + i >= I) continue;
    store_act(act + (u64)p * ld_act + n0 + i, sum_partials(red, warps, m, i) * mg,
              sum_partials(red, warps, m, 16 + i) * mu);
  }
}
#endif

// acc += rows n0 .. n0 + 16 * RT - 1 (clamped to H - 1) of expert e's down projection [H, I] times the
// activation row ``act_row``, over the K chunks [c_lo, c_hi)
__device__ __forceinline__ void down_rows(float (*acc)[RT][NT][4], const u8* w, const u8* s, long long e,
                                          long long w_se, long long s_se, const u16* act_row, int n0,
                                          int g, int t, int H, int I, int c_lo, int c_hi) {
  const u8* wb = w + e * w_se;
  const u8* sb = s + e * s_se;
  const u8* wp[2 * RT];
  const u8* sp[2 * RT];
#pragma unroll
  for (int i = 0; i < 2 * RT; ++i) {
    const int row = min(n0 + g + 8 * i, H - 1);
    wp[i] = wb + (u64)row * (I >> 1) + t * 16;
    sp[i] = sb + (u64)row * (I >> 4) + t * 2;
  }
  const u16* xr[1] = {act_row + t * 32};
  mainloop(acc, wp, sp, xr, c_lo, c_hi);
}

extern "C" __global__ void __launch_bounds__(256, MINB)
nvfp4_moe_down(const u16* __restrict__ act, int ld_act, const u8* __restrict__ w, const u8* __restrict__ s,
               long long w_se, long long s_se, const float* __restrict__ mul, int mul_se,
               const void* __restrict__ ids, int ids64, long long id_st, long long id_sk, int topk, int E,
               const void* __restrict__ rw, int rw_kind, long long rw_st, long long rw_sk,
               float* __restrict__ y, int ldy, int H, int I)
{
  const int p = blockIdx.y;
  const long long e = pair_expert(ids, ids64, id_st, id_sk, p, topk);
  if (e < 0 || e >= E) return;
  __shared__ Partials red;
  clear_partials(red);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int n0 = blockIdx.x * 16 * RT;
  const int chunks = I >> 7;
  float acc[QA][RT][NT][4] = {};
  down_rows(acc, w, s, e, w_se, s_se, act + (u64)p * ld_act, n0, g, t, H, I, chunks * warp / warps,
            chunks * (warp + 1) / warps);
  store_partials(red, acc, warp, 0, g, t);
  __syncthreads();
  const float scale = mul[e * mul_se] * 128.0f * routing_weight(rw, rw_kind, rw_st, rw_sk, p, topk);
  for (int i = threadIdx.x; i < 16 * RT; i += blockDim.x) {
    if (n0 + i < H) y[(u64)p * ldy + n0 + i] = sum_partials(red, warps, 0, i) * scale;
  }
}

// down for pairs sorted by expert (as nvfp4_moe_gate_up_sorted): y [pairs, H] float32, each pair's row
// times its multiplier and routing weight; rows of pairs in no block (routed to no expert) unwritten.
extern "C" __global__ void __launch_bounds__(256, MINB)
nvfp4_moe_down_sorted(const u16* __restrict__ act, int ld_act, const u8* __restrict__ w,
                      const u8* __restrict__ s, long long w_se, long long s_se,
                      const float* __restrict__ mul, int mul_se,
                      const int* __restrict__ pairs, const int* __restrict__ block_expert, int num_pairs,
                      int topk, int E, const void* __restrict__ rw, int rw_kind, long long rw_st,
                      long long rw_sk, float* __restrict__ y, int ldy, int H, int I)
{
  const int b = blockIdx.y;
  const long long e = block_expert[b];
  if (e < 0 || e >= E) return;
  __shared__ Partials red;
  clear_partials(red);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int n0 = blockIdx.x * 16 * RT;
  const int chunks = I >> 7;
  const int pg = pairs[b * 8 + g];
  const int prow = pg < num_pairs ? pg : pairs[b * 8];
  float acc[QA][RT][NT][4] = {};
  down_rows(acc, w, s, e, w_se, s_se, act + (u64)prow * ld_act, n0, g, t, H, I, chunks * warp / warps,
            chunks * (warp + 1) / warps);
  store_partials(red, acc, warp, 0, g, t);
  __syncthreads();
  const float me = mul[e * mul_se] * 128.0f;
  for (int idx = threadIdx.x; idx < 8 * 16 * RT; idx += blockDim.x) {
    const int m = idx / (16 * RT), i = idx % (16 * RT);
    const int p = pairs[b * 8 + m];
    if (p >= num_pairs || n0 + i >= H) continue;
    const float rwp = routing_weight(rw, rw_kind, rw_st, rw_sk, p, topk);
    y[(u64)p * ldy + n0 + i] = sum_partials(red, warps, m, i) * me * rwp;
  }
}

// The down projections of all of one token's pairs and their sum, in one block per 16 * RT columns of
// H: warp w takes pair slot w % topk (and more slots w + warps, ... when topk > warps); with fewer
// slots than warps, the warps of a slot split its K chunks. Each warp scales its partial sums by its
// pair's multiplier and routing weight before the block's shared-memory reduction, so out [T, H] (x's
// dtype) is sum_k w_k * down_{e_k}(act_k), summed in fp32 and rounded once. Only in the
// DOWN_SUM_VARIANT module (its two accumulator sets need one block's registers per SM).
#ifdef PAIR_SUM
static_assert(NT == 1 && WN == 1, "down_sum: one activation row per pair, warps split K (k-group = warp)");
extern "C" __global__ void __launch_bounds__(256, MINB)
nvfp4_moe_down_sum(const u16* __restrict__ act, int ld_act, const u8* __restrict__ w,
                   const u8* __restrict__ s, long long w_se, long long s_se, const float* __restrict__ mul,
                   int mul_se, const void* __restrict__ ids, int ids64, long long id_st, long long id_sk,
                   int topk, int E, const void* __restrict__ rw, int rw_kind, long long rw_st,
                   long long rw_sk, u16* __restrict__ out, int ld_out, int H, int I)
{
  const int tok = blockIdx.y;
  __shared__ Partials red;
  clear_partials(red);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int n0 = blockIdx.x * 16 * RT;
  const int chunks = I >> 7;
  const int parts = topk < warps ? warps / topk : 1;  // warps per slot, splitting its K chunks
  const int part = warp / topk;
  float total[QA][RT][NT][4] = {};
  for (int j = warp % topk; part < parts && j < topk; j += warps) {
    const int p = tok * topk + j;
    const long long e = pair_expert(ids, ids64, id_st, id_sk, p, topk);
    if (e < 0 || e >= E) continue;
    float acc[QA][RT][NT][4] = {};
    down_rows(acc, w, s, e, w_se, s_se, act + (u64)p * ld_act, n0, g, t, H, I, chunks * part / parts,
              chunks * (part + 1) / parts);
    const float scale = mul[e * mul_se] * routing_weight(rw, rw_kind, rw_st, rw_sk, p, topk);
#pragma unroll
    for (int a = 0; a < QA; ++a)
#pragma unroll
      for (int r = 0; r < RT; ++r)
#pragma unroll
        for (int v = 0; v < 4; ++v) total[a][r][0][v] += acc[a][r][0][v] * scale;
    if (topk < warps) break;  // one slot per warp
  }
  store_partials(red, total, warp, 0, g, t);
  __syncthreads();
  for (int i = threadIdx.x; i < 16 * RT; i += blockDim.x) {
    if (n0 + i >= H) continue;
    u16 o;
    asm("cvt.rn." STYPE ".f32 %0, %1;" : "=h"(o) : "f"(sum_partials(red, warps, 0, i) * 128.0f));
    out[(u64)tok * ld_out + n0 + i] = o;
  }
}
#endif
"""
