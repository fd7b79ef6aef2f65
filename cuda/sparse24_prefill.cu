// 2:4 sparse x dense product for many tokens (prefill: 256..16384 tokens), fp16 / bf16, on the
// sparse tensor cores (`mma.sp`, m16n8k32, fp32 accumulation).
//
//   y[t, r] = bias[r] + sum_k W[r, k] x[t, k],  W [N, K] 2:4-sparse along k.
//
// STATUS: this kernel compiles (nvcc 13.0, sm_80 and sm_90a) but has NEVER RUN ON A GPU. The
// metadata order it assumes is written down once below and in cuda/sparse24_layout.py; a GPU
// session should run tests/cuda/test_sparse24_prefill_gpu.py before trusting any number from it.
//
// The product is computed transposed, y^T = W x^T, so that the sparse matrix W is the mma's A
// operand (the only operand mma.sp lets be sparse): W's rows are the mma M dimension, tokens the
// mma N dimension, K the reduction.
//
// Weight layout (made once at load time from the slimc-nm format by cuda/sparse24_layout.py,
// `to_mma_layout`; N padded to a multiple of 128, K to a multiple of 64, padding = zero values):
//   a_vals [N/16][K/32][32 lanes][8]   the A fragment of each 16-row x 32-column tile, in the exact
//                                      register order of mma.m16n8k32 (sparse A), so that one
//                                      16-byte load gives a lane its four .b32 A registers:
//                                      lane = 4*g + t, element e (0..7) is compressed column
//                                      2t + (e&1) + 8*(e>>2) of tile row g + 8*((e>>1)&1).
//   a_meta [N/16][K/32][16]  uint32    the metadata register of the 16 lanes that carry it
//                                      (sparsity selector 0: lanes 4g+0 and 4g+1 of each quad):
//                                      word 2g+t (t = 0, 1) = bits [0,16): tile row g, columns
//                                      [16t, 16t+16); bits [16,32): tile row g+8, same columns.
//                                      Within 16 bits: 4 bits per group of 4 columns, the two
//                                      2-bit positions low first (the slimc-nm order, ascending,
//                                      as mma.sp::ordered_metadata requires).
//
// Tiling: a block owns 128 rows of W x 128 tokens; 8 warps as 2 (rows) x 4 (tokens), a warp
// 64 rows x 32 tokens = 4 x 4 mma tiles, 64 fp32 accumulators per lane. K advances 64 columns
// per stage; a 3-stage cp.async pipeline stages A values (8 KB), metadata (1 KB) and the x tile
// (128 tokens x 64 columns, 16 KB, rows XOR-swizzled in 16-byte chunks so ldmatrix is
// conflict-free). B fragments come from ldmatrix.x4 (four 8x8 matrices = k 0..31 of 8 tokens).
// Tokens past T and columns past K are zero-filled by cp.async (src-size 0).

#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>

namespace slimc_prefill {

constexpr int BM = 128;       // rows of W per block (mma M)
constexpr int BN = 128;       // tokens per block (mma N)
constexpr int BK = 64;        // dense K columns per stage
constexpr int STAGES = 3;
constexpr int THREADS = 256;  // 8 warps: 2 along rows x 4 along tokens
constexpr int WARP_M_TILES = 4;  // 16-row mma tiles per warp (64 rows)
constexpr int WARP_N_TILES = 4;  // 8-token mma tiles per warp (32 tokens)

constexpr int A_STAGE = BM * BK / 2;                  // elements of compressed W per stage (4096)
constexpr int E_STAGE = (BM / 16) * (BK / 32) * 16;   // metadata words per stage (256)
constexpr int B_STAGE = BN * BK;                      // elements of x per stage (8192)
constexpr int STAGE_BYTES = A_STAGE * 2 + E_STAGE * 4 + B_STAGE * 2;  // 25600
constexpr int SMEM_BYTES = STAGES * STAGE_BYTES;                       // 76800

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy; src_bytes 0 writes zeros (and reads nothing).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

template <typename T> struct MmaSp;
template <> struct MmaSp<__half> {
  static __device__ __forceinline__ void run(float (&d)[4], const uint4& a, const uint32_t (&b)[4], uint32_t e) {
    asm volatile(
        "mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.f16.f16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9, %10, %11}, {%0, %1, %2, %3}, %12, 0x0;\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]), "r"(e));
  }
};
template <> struct MmaSp<__nv_bfloat16> {
  static __device__ __forceinline__ void run(float (&d)[4], const uint4& a, const uint32_t (&b)[4], uint32_t e) {
    asm volatile(
        "mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9, %10, %11}, {%0, %1, %2, %3}, %12, 0x0;\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]), "r"(e));
  }
};

__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Offset (elements) of 16-byte chunk `ch` (0..7) of token row `row` in a staged x tile.
__device__ __forceinline__ int b_offset(int row, int ch) { return row * BK + ((ch ^ (row & 7)) << 3); }

// Issue the cp.async copies of K-stage `kb` into shared buffer `buf`.
template <typename T>
__device__ __forceinline__ void load_stage(unsigned char* smem, int buf, int kb, const T* __restrict__ x,
                                           const T* __restrict__ a_vals, const uint32_t* __restrict__ a_meta,
                                           int tokens, int K, int KT, int mt0, int tok0) {
  unsigned char* base = smem + buf * STAGE_BYTES;
  T* sA = reinterpret_cast<T*>(base);
  uint32_t* sE = reinterpret_cast<uint32_t*>(base + A_STAGE * 2);
  T* sB = reinterpret_cast<T*>(base + A_STAGE * 2 + E_STAGE * 4);
  const int tid = threadIdx.x;
  // A: 8 row tiles x (2 k32 tiles x 256 elements, contiguous in global) = 512 chunks of 8 elements.
#pragma unroll
  for (int i = 0; i < (A_STAGE / 8) / THREADS; ++i) {
    const int c = tid + i * THREADS;
    const int mt = c >> 6, within = c & 63;  // 64 chunks per row tile
    const T* src = a_vals + ((static_cast<size_t>(mt0 + mt) * KT + 2 * kb) * 256 + within * 8);
    cp_async16(sA + mt * 512 + within * 8, src, 16);
  }
  // Metadata: 8 row tiles x 32 words (2 k32 tiles x 16) = 64 chunks of 4 words.
  if (tid < E_STAGE / 4) {
    const int mt = tid >> 3, within = tid & 7;
    const uint32_t* src = a_meta + ((static_cast<size_t>(mt0 + mt) * KT + 2 * kb) * 16 + within * 4);
    cp_async16(sE + mt * 32 + within * 4, src, 16);
  }
  // x: 128 token rows x 8 chunks; rows past `tokens` and columns past K read as zeros.
#pragma unroll
  for (int i = 0; i < (B_STAGE / 8) / THREADS; ++i) {
    const int c = tid + i * THREADS;
    const int row = c >> 3, ch = c & 7;
    const int tok = tok0 + row, col = kb * BK + ch * 8;
    const bool ok = tok < tokens && col < K;  // K % 8 == 0: a chunk is all in or all out
    const T* src = ok ? x + (static_cast<size_t>(tok) * K + col) : x;
    cp_async16(sB + b_offset(row, ch), src, ok ? 16 : 0);
  }
}

template <typename T>
__global__ void __launch_bounds__(THREADS, 2)
sparse24_prefill_kernel(const T* __restrict__ x, const T* __restrict__ a_vals, const uint32_t* __restrict__ a_meta,
                        const T* __restrict__ bias, T* __restrict__ y, int tokens, int N, int K, int KT) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  extern __shared__ __align__(128) unsigned char smem[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int warp_m = warp >> 2, warp_n = warp & 3;
  const int mt0 = blockIdx.x * (BM / 16);  // first 16-row tile of the block
  const int tok0 = blockIdx.y * BN;
  const int KB = KT / 2;                   // stages of 64 columns (KT even: K padded to 64)

  float acc[WARP_M_TILES][WARP_N_TILES][4];
#pragma unroll
  for (int i = 0; i < WARP_M_TILES; ++i)
#pragma unroll
    for (int j = 0; j < WARP_N_TILES; ++j)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[i][j][c] = 0.f;

#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < KB) load_stage<T>(smem, s, s, x, a_vals, a_meta, tokens, K, KT, mt0, tok0);
    cp_async_commit();
  }

  // Lane constants: metadata word (lanes 4g+2, 4g+3 are not read by the mma; they load word 2g, 2g+1 too).
  const int e_word = ((lane >> 2) << 1) | (lane & 1);
  const int ld_row = warp_n * 32 + (lane & 7);  // ldmatrix: lanes 8j..8j+7 address matrix j
  const int ld_ch = lane >> 3;

  for (int kb = 0; kb < KB; ++kb) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();  // stage kb visible to all; stage kb-1 fully consumed (its buffer is refilled next)
    {
      const int nk = kb + STAGES - 1;
      if (nk < KB) load_stage<T>(smem, nk % STAGES, nk, x, a_vals, a_meta, tokens, K, KT, mt0, tok0);
      cp_async_commit();
    }
    const unsigned char* base = smem + (kb % STAGES) * STAGE_BYTES;
    const T* sA = reinterpret_cast<const T*>(base);
    const uint32_t* sE = reinterpret_cast<const uint32_t*>(base + A_STAGE * 2);
    const T* sB = reinterpret_cast<const T*>(base + A_STAGE * 2 + E_STAGE * 4);
#pragma unroll
    for (int kk = 0; kk < BK / 32; ++kk) {
      uint4 a[WARP_M_TILES];
      uint32_t e[WARP_M_TILES];
#pragma unroll
      for (int i = 0; i < WARP_M_TILES; ++i) {
        const int mt = warp_m * WARP_M_TILES + i;
        a[i] = *reinterpret_cast<const uint4*>(sA + mt * 512 + kk * 256 + lane * 8);
        e[i] = sE[mt * 32 + kk * 16 + e_word];
      }
      uint32_t b[WARP_N_TILES][4];
#pragma unroll
      for (int j = 0; j < WARP_N_TILES; ++j) ldmatrix_x4(b[j], sB + b_offset(ld_row + j * 8, kk * 4 + ld_ch));
#pragma unroll
      for (int i = 0; i < WARP_M_TILES; ++i)
#pragma unroll
        for (int j = 0; j < WARP_N_TILES; ++j) MmaSp<T>::run(acc[i][j], a[i], b[j], e[i]);
    }
  }
  cp_async_wait<0>();

  // Epilogue: accumulator c0,c1 = (row g, tokens 2t, 2t+1), c2,c3 = (row g+8, same tokens).
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int i = 0; i < WARP_M_TILES; ++i) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = (mt0 + warp_m * WARP_M_TILES + i) * 16 + g + 8 * h;
      if (r >= N) continue;
      const float bv = bias != nullptr ? to_float(bias[r]) : 0.f;
#pragma unroll
      for (int j = 0; j < WARP_N_TILES; ++j) {
        const int tok = tok0 + warp_n * 32 + j * 8 + 2 * t;
        if (tok < tokens) y[static_cast<size_t>(tok) * N + r] = from_float<T>(acc[i][j][2 * h] + bv);
        if (tok + 1 < tokens) y[static_cast<size_t>(tok + 1) * N + r] = from_float<T>(acc[i][j][2 * h + 1] + bv);
      }
    }
  }
#endif
}

template <typename T>
cudaError_t launch(const void* x, const void* a_vals, const void* a_meta, const void* bias, void* y, int tokens, int N,
                   int K, int KT, cudaStream_t stream) {
  // Raise the dynamic shared-memory limit once per device (the attribute is per function and device).
  static unsigned long long configured = 0;  // bit d: done on device d (< 64)
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  const unsigned long long bit = dev < 64 ? 1ull << dev : 0ull;
  if (bit == 0 || !(configured & bit)) {
    err = cudaFuncSetAttribute(sparse24_prefill_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, SMEM_BYTES);
    if (err != cudaSuccess) return err;
    configured |= bit;
  }
  const int n_pad = (N + BM - 1) / BM;
  dim3 grid(n_pad, (tokens + BN - 1) / BN);
  sparse24_prefill_kernel<T><<<grid, THREADS, SMEM_BYTES, stream>>>(
      static_cast<const T*>(x), static_cast<const T*>(a_vals), static_cast<const uint32_t*>(a_meta),
      static_cast<const T*>(bias), static_cast<T*>(y), tokens, N, K, KT);
  return cudaGetLastError();
}

}  // namespace slimc_prefill

// ---- C interface used by the torch binding (cuda/sparse24_ops.py) ----

// x [tokens, K] row-major; a_vals / a_meta in the layout above for N rows padded to a multiple of
// 128 (= BM) and K padded to K_pad, a multiple of 64; y [tokens, N]. dtype: 0 = fp16, 1 = bf16.
// Requires K % 8 == 0, all pointers 16-byte aligned (bias and y: 2-byte), contiguous tensors, a
// GPU of compute capability >= 8.0. Returns a cudaError_t (0 = success).
extern "C" int slimc_sparse24_prefill(const void* x, const void* a_vals, const void* a_meta, const void* bias, void* y,
                                      int tokens, int N, int K, int K_pad, int dtype, void* stream) {
  if (tokens <= 0 || N <= 0 || K <= 0 || K % 8 != 0 || K_pad % slimc_prefill::BK != 0 || K_pad < K ||
      K_pad - K >= slimc_prefill::BK)
    return static_cast<int>(cudaErrorInvalidValue);
  if ((reinterpret_cast<uintptr_t>(x) | reinterpret_cast<uintptr_t>(a_vals) | reinterpret_cast<uintptr_t>(a_meta)) % 16 != 0)
    return static_cast<int>(cudaErrorMisalignedAddress);
  int dev = 0, major = 0;
  if (cudaGetDevice(&dev) == cudaSuccess && cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess &&
      major < 8)
    return static_cast<int>(cudaErrorNotSupported);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const int KT = K_pad / 32;
  const cudaError_t err = dtype == 0 ? slimc_prefill::launch<__half>(x, a_vals, a_meta, bias, y, tokens, N, K, KT, s)
                                     : slimc_prefill::launch<__nv_bfloat16>(x, a_vals, a_meta, bias, y, tokens, N, K, KT, s);
  return static_cast<int>(err);
}
