// 2:4 sparse x dense product for skinny activations (decode: 1..64 tokens), fp16 / bf16.
//
//   y[t, r] = bias[r] + sum_k W[r, k] x[t, k],  W 2:4-sparse along k, stored in the slimc-nm format
//   (compiler/sparse_format.py):
//     values [N, K/2]   the 2 kept values of each group of 4 inputs, in column order
//     meta   [N, K/8]   uint8, 2-bit position of each kept value, little-endian; read here as
//                       uint32 words: word w of row r holds the 16 positions of kept values
//                       16w..16w+15, i.e. of input columns 32w..32w+31.
//
// Why this shape: decode is memory-bound. The weight stream (values + metadata, 56.25% of the dense
// bytes) is read exactly once per token tile, with 32-byte value loads + 4-byte metadata loads
// per lane, consecutive lanes on consecutive words (coalesced). The activations are tiny, so each
// block stages its slice of x in shared memory, transposed to [column][token] so that one
// (vector) shared-memory load gives a kept weight's partner for every token of the tile.
//
// Work split: a block owns ROWS = WARPS*R consecutive rows and a K-chunk; each warp owns R rows,
// each lane a strided set of 32-column words. Partial sums go through a warp butterfly; with more
// than one K-chunk (split-K, to fill the GPU when N is small) partials land in an fp32 workspace
// that a second kernel reduces (deterministic, no atomics).
//
// TODO(prefill): for many tokens (> 64) this CUDA-core kernel loses to dense tensor cores; a
// prefill kernel with `mma.sp` (sparse tensor cores, m16n8k32 for fp16/bf16) reading this same
// metadata (reordered per mma fragment) is the next step. The Python dispatcher uses dense cuBLAS
// there meanwhile.

#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>

namespace {

constexpr int WARPS = 8;
constexpr int THREADS = WARPS * 32;

__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <typename T> __device__ __forceinline__ float bits_to_float(unsigned short b);
template <> __device__ __forceinline__ float bits_to_float<__half>(unsigned short b) { return __half2float(__ushort_as_half(b)); }
template <> __device__ __forceinline__ float bits_to_float<__nv_bfloat16>(unsigned short b) {
  return __bfloat162float(__ushort_as_bfloat16(b));
}

// 16-bit element i (0..7) of a 16-byte vector, as float.
template <typename T>
__device__ __forceinline__ float elem(const uint4& q, int i) {
  const uint32_t word = i < 2 ? q.x : i < 4 ? q.y : i < 6 ? q.z : q.w;
  const unsigned short bits = static_cast<unsigned short>((i & 1) ? (word >> 16) : (word & 0xffffu));
  return bits_to_float<T>(bits);
}

// Padding (in elements) after each 32-column word of the staged activations: shifts consecutive
// words' bases by 4..16 bytes across banks, and keeps every vector load aligned.
template <int TT> struct Stage {
  static constexpr int PAD = TT < 2 ? 2 : (TT > 8 ? 8 : TT);
  static constexpr int WORD = 32 * TT + PAD;  // elements per staged word
};

// Load the TT token values of staged column c (of word base `base`) as floats.
template <typename T, int TT>
__device__ __forceinline__ void load_x(const T* sx, int idx, float (&xv)[TT]) {
  if constexpr (TT == 1) {
    xv[0] = to_float(sx[idx]);
  } else if constexpr (TT == 2) {
    const uint32_t u = *reinterpret_cast<const uint32_t*>(sx + idx);
    uint4 q = make_uint4(u, 0, 0, 0);
    xv[0] = elem<T>(q, 0);
    xv[1] = elem<T>(q, 1);
  } else if constexpr (TT == 4) {
    const uint2 u = *reinterpret_cast<const uint2*>(sx + idx);
    uint4 q = make_uint4(u.x, u.y, 0, 0);
#pragma unroll
    for (int t = 0; t < 4; ++t) xv[t] = elem<T>(q, t);
  } else {
#pragma unroll
    for (int h = 0; h < TT / 8; ++h) {
      const uint4 q = *reinterpret_cast<const uint4*>(sx + idx + 8 * h);
#pragma unroll
      for (int t = 0; t < 8; ++t) xv[8 * h + t] = elem<T>(q, t);
    }
  }
}

template <typename T, int TT, int R>
__global__ void __launch_bounds__(THREADS)
sparse24_decode_kernel(const T* __restrict__ x, const T* __restrict__ values, const uint32_t* __restrict__ meta,
                       const T* __restrict__ bias, T* __restrict__ y, float* __restrict__ ws,
                       int tokens, int N, int K, int kchunk) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sx = reinterpret_cast<T*>(smem_raw);

  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int row0 = blockIdx.x * (WARPS * R) + warp * R;
  const int k0 = blockIdx.y * kchunk;
  const int kc = min(kchunk, K - k0);  // columns in this chunk (a multiple of 32)
  const int nwords = kc >> 5;
  const int t0 = blockIdx.z * TT;

  // Stage x[t0:t0+TT, k0:k0+kc] as [word][column-in-word][token] (+ padding per word).
  for (int i = threadIdx.x; i < TT * kc; i += THREADS) {
    const int t = i / kc, c = i - t * kc;
    T v = from_float<T>(0.f);
    if (t0 + t < tokens) v = x[static_cast<size_t>(t0 + t) * K + k0 + c];
    sx[(c >> 5) * Stage<TT>::WORD + (c & 31) * TT + t] = v;
  }
  __syncthreads();

  float acc[R][TT];
#pragma unroll
  for (int rr = 0; rr < R; ++rr)
#pragma unroll
    for (int t = 0; t < TT; ++t) acc[rr][t] = 0.f;

  const size_t vstride = static_cast<size_t>(K) / 2;   // values per row
  const size_t mstride = static_cast<size_t>(K) / 32;  // metadata words per row
  const int wbase = k0 >> 5;

  for (int wi = lane; wi < nwords; wi += 32) {
    // Issue every row's weight loads before using any (several independent loads in flight).
    uint4 va[R], vb[R];
    uint32_t mw[R];
#pragma unroll
    for (int rr = 0; rr < R; ++rr) {
      const int r = row0 + rr;
      if (r < N) {
        const uint4* vp = reinterpret_cast<const uint4*>(values + r * vstride + static_cast<size_t>(wbase + wi) * 16);
        va[rr] = __ldg(vp);
        vb[rr] = __ldg(vp + 1);
        mw[rr] = __ldg(meta + r * mstride + wbase + wi);
      } else {
        va[rr] = vb[rr] = make_uint4(0, 0, 0, 0);
        mw[rr] = 0;
      }
    }
    const int sbase = wi * Stage<TT>::WORD;
#pragma unroll
    for (int rr = 0; rr < R; ++rr) {
#pragma unroll
      for (int i = 0; i < 16; ++i) {
        const int pos = (mw[rr] >> (2 * i)) & 3;
        const int col = 4 * (i >> 1) + pos;  // column inside the 32-column word
        const float w = i < 8 ? elem<T>(va[rr], i) : elem<T>(vb[rr], i - 8);
        float xv[TT];
        load_x<T, TT>(sx, sbase + col * TT, xv);
#pragma unroll
        for (int t = 0; t < TT; ++t) acc[rr][t] = fmaf(w, xv[t], acc[rr][t]);
      }
    }
  }

  // Butterfly: every lane ends with the full sums; lane j writes output j (spreads the stores).
#pragma unroll
  for (int rr = 0; rr < R; ++rr) {
#pragma unroll
    for (int t = 0; t < TT; ++t) {
      float v = acc[rr][t];
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
      const int r = row0 + rr, tok = t0 + t;
      if (lane == ((rr * TT + t) & 31) && r < N && tok < tokens) {
        if (gridDim.y == 1) {
          if (bias != nullptr) v += to_float(bias[r]);
          y[static_cast<size_t>(tok) * N + r] = from_float<T>(v);
        } else {
          ws[(static_cast<size_t>(blockIdx.y) * tokens + tok) * N + r] = v;
        }
      }
    }
  }
}

template <typename T>
__global__ void splitk_reduce_kernel(const float* __restrict__ ws, const T* __restrict__ bias, T* __restrict__ y,
                                     int tokens, int N, int ksplit) {
  const size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const size_t total = static_cast<size_t>(tokens) * N;
  if (i >= total) return;
  float v = 0.f;
  for (int s = 0; s < ksplit; ++s) v += ws[static_cast<size_t>(s) * total + i];
  if (bias != nullptr) v += to_float(bias[i % N]);
  y[i] = from_float<T>(v);
}

template <typename T, int TT, int R>
cudaError_t launch_tile(const T* x, const T* values, const uint32_t* meta, const T* bias, T* y, float* ws,
                        int tokens, int N, int K, int kchunk, cudaStream_t stream) {
  const int rows = WARPS * R;
  const int ksplit = (K + kchunk - 1) / kchunk;
  dim3 grid((N + rows - 1) / rows, ksplit, (tokens + TT - 1) / TT);
  const size_t smem = static_cast<size_t>(kchunk / 32) * Stage<TT>::WORD * sizeof(T);
  sparse24_decode_kernel<T, TT, R><<<grid, THREADS, smem, stream>>>(x, values, meta, bias, y, ws, tokens, N, K, kchunk);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || ksplit == 1) return err;
  const size_t total = static_cast<size_t>(tokens) * N;
  splitk_reduce_kernel<T><<<static_cast<unsigned>((total + 255) / 256), 256, 0, stream>>>(ws, bias, y, tokens, N, ksplit);
  return cudaGetLastError();
}

int sm_count() {
  static int count = 0;
  if (count == 0) {
    int dev = 0;
    if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess)
      count = 132;
  }
  return count;
}

int tile_for(int tokens) { return tokens <= 1 ? 1 : tokens <= 2 ? 2 : tokens <= 4 ? 4 : tokens <= 8 ? 8 : 16; }
int rows_per_warp(int tt) { return tt >= 16 ? 2 : 4; }

// K-chunk: as wide as 32 KB of staged activations allows, then halved (down to 1024 columns, so
// every lane still has a word) until the grid has about two blocks per SM.
int choose_kchunk(int tokens, int N, int K) {
  const int tt = tile_for(tokens);
  const int rows = WARPS * rows_per_warp(tt);
  int kc = 16384 / tt;
  if (kc > K) kc = K;
  const long row_blocks = (N + rows - 1) / rows;
  const long token_blocks = (tokens + tt - 1) / tt;
  while (kc > 1024 && row_blocks * token_blocks * ((K + kc - 1) / kc) < 2L * sm_count()) kc = (kc / 2 + 31) / 32 * 32;
  return kc;  // a multiple of 32, as K is
}

template <typename T>
cudaError_t dispatch(const void* x, const void* values, const void* meta, const void* bias, void* y, void* ws,
                     int tokens, int N, int K, int kchunk, cudaStream_t s) {
  auto xp = static_cast<const T*>(x);
  auto vp = static_cast<const T*>(values);
  auto mp = static_cast<const uint32_t*>(meta);
  auto bp = static_cast<const T*>(bias);
  auto yp = static_cast<T*>(y);
  auto wp = static_cast<float*>(ws);
  switch (tile_for(tokens)) {
    case 1: return launch_tile<T, 1, 4>(xp, vp, mp, bp, yp, wp, tokens, N, K, kchunk, s);
    case 2: return launch_tile<T, 2, 4>(xp, vp, mp, bp, yp, wp, tokens, N, K, kchunk, s);
    case 4: return launch_tile<T, 4, 4>(xp, vp, mp, bp, yp, wp, tokens, N, K, kchunk, s);
    case 8: return launch_tile<T, 8, 4>(xp, vp, mp, bp, yp, wp, tokens, N, K, kchunk, s);
    default: return launch_tile<T, 16, 2>(xp, vp, mp, bp, yp, wp, tokens, N, K, kchunk, s);
  }
}

}  // namespace

// ---- C interface used by the torch binding (cuda/sparse24_ops.py) ----

// Workspace the launch needs (fp32 elements); 0 when the product runs in one K-chunk.
extern "C" long long slimc_sparse24_workspace(int tokens, int N, int K) {
  const int kc = choose_kchunk(tokens, N, K);
  const int ksplit = (K + kc - 1) / kc;
  return ksplit > 1 ? static_cast<long long>(ksplit) * tokens * N : 0;
}

// dtype: 0 = fp16, 1 = bf16. Requires K % 32 == 0, values 16-byte aligned, meta 4-byte aligned,
// all tensors contiguous. Returns a cudaError_t (0 = success).
extern "C" int slimc_sparse24_decode(const void* x, const void* values, const void* meta, const void* bias, void* y,
                                     void* ws, int tokens, int N, int K, int dtype, void* stream) {
  if (K % 32 != 0 || tokens <= 0 || N <= 0) return static_cast<int>(cudaErrorInvalidValue);
  const int kc = choose_kchunk(tokens, N, K);
  if ((K + kc - 1) / kc > 1 && ws == nullptr) return static_cast<int>(cudaErrorInvalidValue);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const cudaError_t err = dtype == 0 ? dispatch<__half>(x, values, meta, bias, y, ws, tokens, N, K, kc, s)
                                     : dispatch<__nv_bfloat16>(x, values, meta, bias, y, ws, tokens, N, K, kc, s);
  return static_cast<int>(err);
}

extern "C" const char* slimc_sparse24_error_string(int code) {
  return cudaGetErrorString(static_cast<cudaError_t>(code));
}
