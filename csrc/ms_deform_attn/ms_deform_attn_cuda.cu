// CUDA launcher of multi-scale deformable attention.
//
// Work decomposition. A row is one (n, q, m) triple: L * P samples of D channels. Each row gets
// R = lanes threads (a power of two <= 32, so rows never straddle warps), each owning kVec
// consecutive channels per vector (16-byte loads: 4 fp32, 8 fp16 / bf16, 2 fp64) and up to
// kChunks vectors, so D = 16 fp32 uses 4 lanes per row instead of idling half a warp, and
// D = 256 (M = 1) covers all channels in one pass. The samples of a row are set up
// cooperatively: in each round lane j computes the bilinear setup of sample k0 + j (coalesced
// loc / attn loads, the setup done once instead of by every lane) and the row's lanes read it
// with width-R shuffles, then gather their channels with all four corners' loads issued
// together (the sample loop is unrolled). Pixels of one level are indexed in 32 bits; each level
// adds one 64-bit base. The level table travels by value in the kernel parameters
// (__grid_constant__), read from the host: no device-to-host copy, nothing to wait for, and
// the launches can be captured in CUDA graphs.
//
// The per-sample setup and the per-channel arithmetic are the functions of ms_deform_attn_math.h
// that the CPU launcher uses too, so the CPU tests check this arithmetic.
//
// Backward. The same rows; each lane accumulates its channels' parts of the attention and
// location gradients of a sample, a width-R butterfly sums them, and the sample's owner lane
// keeps the sums and writes them (coalesced, once per sample: no atomics, no zero-fill).
// grad_value is scattered with atomics into an fp32 buffer for fp16 / bf16 (vector float2 /
// float4 atomics on sm_90+). Under torch.use_deterministic_algorithms(True) grad_value is
// instead gathered: every (sample, corner) contribution gets the key of the value row it
// updates, a stable sort groups them, and one thread group per value row sums its
// contributions in a fixed order (that of the CPU kernel), so the result is bit-identical from
// run to run. Only the gradients autograd asks for are computed.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <optional>
#include <type_traits>

#include "ms_deform_attn.h"
#include "ms_deform_attn_math.h"

namespace align_detr {
namespace {

using msda::Bilinear;

constexpr int kThreads = 256;
// At least 4 blocks of 256 threads per SM (half the threads an SM holds): at most 64 registers.
// The kernels are latency-bound gathers and scatters, so resident warps matter more than a
// few spilled registers in the rare wide configurations.
constexpr int kMinBlocks = 4;
constexpr int kMaxLevels = 16;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int64_t kNoKey = std::numeric_limits<int64_t>::max();  // sorts after every value row

// Sizes and the level table of one call, passed by value.
struct Params {
  int32_t H[kMaxLevels];
  int32_t W[kMaxLevels];
  int64_t start[kMaxLevels];  // first value row of each level
  int64_t rows;               // N * Lq * M
  int64_t S;                  // value rows per image
  int32_t M, D, Lq, P, LP;
  int32_t MD;     // M * D: the stride between neighbouring pixels of a head
  int32_t lanes;  // threads per row, a power of two <= 32
  int32_t vecs;   // kVec-channel vectors per row (D / kVec)
};

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

template <int kVec, typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_vec(const scalar_t* __restrict__ p, acc_t (&out)[kVec]) {
  const Vec<scalar_t, kVec> x = *reinterpret_cast<const Vec<scalar_t, kVec>*>(p);
#pragma unroll
  for (int e = 0; e < kVec; ++e) out[e] = static_cast<acc_t>(x.v[e]);
}

template <int kVec, typename scalar_t, typename acc_t>
__device__ __forceinline__ void store_vec(scalar_t* p, const acc_t (&in)[kVec]) {
  Vec<scalar_t, kVec> x;
#pragma unroll
  for (int e = 0; e < kVec; ++e) x.v[e] = static_cast<scalar_t>(in[e]);
  *reinterpret_cast<Vec<scalar_t, kVec>*>(p) = x;
}

template <int kVec>
__device__ __forceinline__ void atomic_add_vec(float* p, const float (&v)[kVec]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  constexpr int kStep = kVec % 4 == 0 ? 4 : kVec % 2 == 0 ? 2 : 1;
#else
  constexpr int kStep = 1;
#endif
#pragma unroll
  for (int e = 0; e < kVec; e += kStep) {
    if constexpr (kStep == 4) {
      atomicAdd(reinterpret_cast<float4*>(p + e), make_float4(v[e], v[e + 1], v[e + 2], v[e + 3]));
    } else if constexpr (kStep == 2) {
      atomicAdd(reinterpret_cast<float2*>(p + e), make_float2(v[e], v[e + 1]));
    } else {
      atomicAdd(p + e, v[e]);
    }
  }
}

template <int kVec>
__device__ __forceinline__ void atomic_add_vec(double* p, const double (&v)[kVec]) {
#pragma unroll
  for (int e = 0; e < kVec; ++e) atomicAdd(p + e, v[e]);
}

// Sum over the R lanes of a row (every lane gets the total).
template <typename acc_t>
__device__ __forceinline__ acc_t row_sum(acc_t v, int R) {
  for (int o = R / 2; o > 0; o /= 2) v += __shfl_xor_sync(kFullMask, v, o, R);
  return v;
}

// The row a thread works on, and its lane in the row. Threads past the last row mirror it
// (they take part in the shuffles) but load nothing of their own and store nothing.
struct RowOf {
  int64_t row;
  int lane;
  bool active;
  __device__ RowOf(const Params& p) {
    const int R = p.lanes;
    lane = threadIdx.x & (R - 1);
    const int64_t raw = static_cast<int64_t>(blockIdx.x) * (kThreads / R) + threadIdx.x / R;
    active = raw < p.rows;
    row = active ? raw : p.rows - 1;
  }
};

// Packs the corner mask and the level of a sample into one shuffled word.
__device__ __forceinline__ uint32_t pack_meta(uint32_t mask, int level) {
  return mask | static_cast<uint32_t>(level) << 4;
}

// Element offsets of the four corners inside their level (meaningful where the mask is set;
// H * W * M * D < 2^31 is checked on the host).
__device__ __forceinline__ void corner_offsets(int32_t pix0, int32_t W, int32_t MD,
                                               int32_t (&off)[4]) {
#pragma unroll
  for (int c = 0; c < 4; ++c) off[c] = msda::corner_pixel(pix0, c, W) * MD;
}

template <int kVec, typename scalar_t, typename acc_t>
__device__ __forceinline__ void gather_corners(const scalar_t* __restrict__ lvl,
                                               const int32_t (&off)[4], uint32_t mask, int d,
                                               acc_t (&c)[4][kVec]) {
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    if ((mask >> k) & 1u) {
      load_vec<kVec>(lvl + off[k] + d, c[k]);
    } else {
#pragma unroll
      for (int e = 0; e < kVec; ++e) c[k][e] = acc_t(0);
    }
  }
}

template <typename scalar_t, int kVec, int kChunks>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    ms_deform_attn_forward_kernel(const __grid_constant__ Params p,
                                  const scalar_t* __restrict__ value,
                                  const scalar_t* __restrict__ loc,
                                  const scalar_t* __restrict__ attn, scalar_t* __restrict__ out) {
  using acc_t = at::opmath_type<scalar_t>;
  const RowOf r(p);
  const int R = p.lanes;
  const int64_t m = r.row % p.M;
  const int64_t n = r.row / (static_cast<int64_t>(p.Lq) * p.M);
  const scalar_t* head = value + n * p.S * p.MD + m * p.D;
  const scalar_t* row_loc = loc + r.row * p.LP * 2;
  const scalar_t* row_attn = attn + r.row * p.LP;
  scalar_t* row_out = out + r.row * p.D;

  // One pass unless D needs more than R * kChunks vectors.
  for (int v0 = 0; v0 < p.vecs; v0 += R * kChunks) {
    acc_t acc[kChunks][kVec];
#pragma unroll
    for (int ch = 0; ch < kChunks; ++ch) {
#pragma unroll
      for (int e = 0; e < kVec; ++e) acc[ch][e] = acc_t(0);
    }
    for (int k0 = 0; k0 < p.LP; k0 += R) {
      // This lane's sample of the round: setup once, shared with the row below.
      uint32_t my_meta = 0;
      int32_t my_pix0 = 0;
      acc_t my_w[4] = {acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
      const int k = k0 + r.lane;
      if (r.active && k < p.LP) {
        const int l = k / p.P;
        Bilinear<acc_t> s;
        if (msda::bilinear_setup<acc_t>(static_cast<acc_t>(row_loc[2 * k]),
                                        static_cast<acc_t>(row_loc[2 * k + 1]), p.H[l], p.W[l],
                                        s)) {
          const Bilinear<acc_t> sw = msda::scale_weights<acc_t>(s, static_cast<acc_t>(row_attn[k]));
          my_meta = pack_meta(s.mask, l);
          my_pix0 = s.pix0;
#pragma unroll
          for (int c = 0; c < 4; ++c) my_w[c] = sw.weight[c];
        }
      }
      const int count = min(R, p.LP - k0);  // the same for every row: shuffles stay uniform
#pragma unroll 4
      for (int j = 0; j < count; ++j) {
        const uint32_t meta = __shfl_sync(kFullMask, my_meta, j, R);
        const int32_t pix0 = __shfl_sync(kFullMask, my_pix0, j, R);
        acc_t w[4];
#pragma unroll
        for (int c = 0; c < 4; ++c) w[c] = __shfl_sync(kFullMask, my_w[c], j, R);
        const uint32_t mask = meta & 0xFu;
        if (mask == 0) continue;  // outside the map (or NaN): contributes nothing
        const int l = static_cast<int>(meta >> 4);
        const scalar_t* lvl = head + p.start[l] * p.MD;
        int32_t off[4];
        corner_offsets(pix0, p.W[l], p.MD, off);
#pragma unroll
        for (int ch = 0; ch < kChunks; ++ch) {
          const int v = v0 + r.lane + ch * R;
          if (v < p.vecs) {
            acc_t c[4][kVec];
            gather_corners<kVec>(lvl, off, mask, v * kVec, c);
#pragma unroll
            for (int e = 0; e < kVec; ++e) {
              acc[ch][e] += msda::interpolate<acc_t>(w, c[0][e], c[1][e], c[2][e], c[3][e]);
            }
          }
        }
      }
    }
    if (r.active) {
#pragma unroll
      for (int ch = 0; ch < kChunks; ++ch) {
        const int v = v0 + r.lane + ch * R;
        if (v < p.vecs) store_vec<kVec>(row_out + v * kVec, acc[ch]);
      }
    }
  }
}

// grad_value (accumulator, nullable), grad_loc and grad_attn (nullable) of every row.
template <typename scalar_t, int kVec, int kChunks>
__global__ void __launch_bounds__(kThreads, kMinBlocks) ms_deform_attn_backward_kernel(
    const __grid_constant__ Params p, const scalar_t* __restrict__ value,
    const scalar_t* __restrict__ loc, const scalar_t* __restrict__ attn,
    const scalar_t* __restrict__ grad_out, at::opmath_type<scalar_t>* __restrict__ grad_value,
    scalar_t* __restrict__ grad_loc, scalar_t* __restrict__ grad_attn) {
  using acc_t = at::opmath_type<scalar_t>;
  const RowOf r(p);
  const int R = p.lanes;
  const int64_t m = r.row % p.M;
  const int64_t n = r.row / (static_cast<int64_t>(p.Lq) * p.M);
  const int64_t head_offset = n * p.S * p.MD + m * p.D;
  const scalar_t* head = value + head_offset;
  acc_t* grad_head = grad_value != nullptr ? grad_value + head_offset : nullptr;
  const scalar_t* row_loc = loc + r.row * p.LP * 2;
  const scalar_t* row_attn = attn + r.row * p.LP;
  const scalar_t* row_g = grad_out + r.row * p.D;
  const bool want_reduced = grad_loc != nullptr || grad_attn != nullptr;  // uniform

  for (int k0 = 0; k0 < p.LP; k0 += R) {
    // This lane's sample of the round.
    uint32_t my_meta = 0;
    int32_t my_pix0 = 0;
    acc_t my_lx = 0, my_ly = 0, my_a = 0;
    int my_level = 0;
    const int k = k0 + r.lane;
    if (r.active && k < p.LP) {
      my_level = k / p.P;
      Bilinear<acc_t> s;
      if (msda::bilinear_setup<acc_t>(static_cast<acc_t>(row_loc[2 * k]),
                                      static_cast<acc_t>(row_loc[2 * k + 1]), p.H[my_level],
                                      p.W[my_level], s)) {
        my_meta = pack_meta(s.mask, my_level);
        my_pix0 = s.pix0;
        my_lx = s.lx;
        my_ly = s.ly;
        my_a = static_cast<acc_t>(row_attn[k]);
      }
    }
    // Sums of the sample this lane owns (lane j owns sample k0 + j).
    acc_t own_ga = 0, own_gx = 0, own_gy = 0;
    const int count = min(R, p.LP - k0);
    for (int v0 = 0; v0 < p.vecs; v0 += R * kChunks) {  // one pass unless D is large
      acc_t g[kChunks][kVec];
#pragma unroll
      for (int ch = 0; ch < kChunks; ++ch) {
        const int v = v0 + r.lane + ch * R;
        if (v < p.vecs) {
          load_vec<kVec>(row_g + v * kVec, g[ch]);
        } else {
#pragma unroll
          for (int e = 0; e < kVec; ++e) g[ch][e] = acc_t(0);
        }
      }
#pragma unroll 2
      for (int j = 0; j < count; ++j) {
        const uint32_t meta = __shfl_sync(kFullMask, my_meta, j, R);
        const int32_t pix0 = __shfl_sync(kFullMask, my_pix0, j, R);
        const acc_t lx = __shfl_sync(kFullMask, my_lx, j, R);
        const acc_t ly = __shfl_sync(kFullMask, my_ly, j, R);
        const acc_t a = __shfl_sync(kFullMask, my_a, j, R);
        const uint32_t mask = meta & 0xFu;
        acc_t ga = 0, gx = 0, gy = 0;
        if (mask != 0) {
          Bilinear<acc_t> s;
          s.pix0 = pix0;
          s.mask = mask;
          s.lx = lx;
          s.ly = ly;
          msda::corner_weights<acc_t>(lx, ly, mask, s.weight);
          const Bilinear<acc_t> sw = msda::scale_weights<acc_t>(s, a);
          const int l = static_cast<int>(meta >> 4);
          const int64_t level_offset = p.start[l] * p.MD;
          int32_t off[4];
          corner_offsets(pix0, p.W[l], p.MD, off);
#pragma unroll
          for (int ch = 0; ch < kChunks; ++ch) {
            const int v = v0 + r.lane + ch * R;
            if (v >= p.vecs) continue;
            const int d = v * kVec;
            if (want_reduced) {
              acc_t c[4][kVec];
              gather_corners<kVec>(head + level_offset, off, mask, d, c);
#pragma unroll
              for (int e = 0; e < kVec; ++e) {
                msda::bilinear_backward<acc_t>(s, c[0][e], c[1][e], c[2][e], c[3][e], g[ch][e], ga,
                                               gx, gy);
              }
            }
            if (grad_head != nullptr) {
#pragma unroll
              for (int c = 0; c < 4; ++c) {
                if (!((mask >> c) & 1u)) continue;
                acc_t contrib[kVec];
#pragma unroll
                for (int e = 0; e < kVec; ++e) contrib[e] = sw.weight[c] * g[ch][e];
                atomic_add_vec<kVec>(grad_head + level_offset + off[c] + d, contrib);
              }
            }
          }
        }
        if (want_reduced) {  // every lane of the warp gets here: the shuffles are uniform
          ga = row_sum(ga, R);
          gx = row_sum(gx, R);
          gy = row_sum(gy, R);
          if (r.lane == j) {
            own_ga += ga;
            own_gx += gx;
            own_gy += gy;
          }
        }
      }
    }
    if (want_reduced && r.active && k < p.LP) {
      const int64_t i = r.row * p.LP + k;
      const bool valid = (my_meta & 0xFu) != 0;
      if (grad_attn != nullptr) grad_attn[i] = static_cast<scalar_t>(valid ? own_ga : acc_t(0));
      if (grad_loc != nullptr) {
        grad_loc[2 * i] = static_cast<scalar_t>(
            valid ? msda::location_gradient<acc_t>(own_gx, my_a, p.W[my_level]) : acc_t(0));
        grad_loc[2 * i + 1] = static_cast<scalar_t>(
            valid ? msda::location_gradient<acc_t>(own_gy, my_a, p.H[my_level]) : acc_t(0));
      }
    }
  }
}

// ---- deterministic grad_value ----------------------------------------------------------------

// Contribution r = 4 * sample + corner: the (n, s, m) value row it updates (kNoKey when the
// corner is outside the map or the sample contributes nothing) and its weight
// attention * bilinear weight, exactly as the atomic path computes them.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    ms_deform_attn_keys_kernel(const __grid_constant__ Params p, const scalar_t* __restrict__ loc,
                               const scalar_t* __restrict__ attn, int64_t* __restrict__ keys,
                               at::opmath_type<scalar_t>* __restrict__ weights, int64_t samples) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < samples;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t row = i / p.LP;
    const int k = static_cast<int>(i - row * p.LP);
    const int l = k / p.P;
    const int64_t m = row % p.M;
    const int64_t n = row / (static_cast<int64_t>(p.Lq) * p.M);
    Bilinear<acc_t> s{};
    const bool valid = msda::bilinear_setup<acc_t>(
        static_cast<acc_t>(loc[2 * i]), static_cast<acc_t>(loc[2 * i + 1]), p.H[l], p.W[l], s);
    Bilinear<acc_t> sw{};
    if (valid) sw = msda::scale_weights<acc_t>(s, static_cast<acc_t>(attn[i]));
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const bool inside = valid && ((s.mask >> c) & 1u);
      const int64_t pixel = p.start[l] + msda::corner_pixel(s.pix0, c, p.W[l]);
      keys[4 * i + c] = inside ? (n * p.S + pixel) * p.M + m : kNoKey;
      weights[4 * i + c] = inside ? sw.weight[c] : acc_t(0);
    }
  }
}

// One row-group of R lanes per sorted contribution; the group at the first contribution of a
// value row sums all of that row's contributions in sorted (= sample, corner) order and writes
// the row: one writer per row, a fixed order, no atomics.
template <typename scalar_t, int kVec>
__global__ void __launch_bounds__(kThreads)
    ms_deform_attn_gather_grad_value_kernel(const __grid_constant__ Params p,
                                            const int64_t* __restrict__ sorted_keys,
                                            const int64_t* __restrict__ order,
                                            const at::opmath_type<scalar_t>* __restrict__ weights,
                                            const scalar_t* __restrict__ grad_out,
                                            scalar_t* __restrict__ grad_value,
                                            int64_t contributions) {
  using acc_t = at::opmath_type<scalar_t>;
  const int R = p.lanes;
  const int lane = threadIdx.x & (R - 1);
  const int64_t j = static_cast<int64_t>(blockIdx.x) * (kThreads / R) + threadIdx.x / R;
  if (j >= contributions) return;  // no shuffles in this kernel: lanes may leave freely
  const int64_t key = sorted_keys[j];
  if (key == kNoKey || (j > 0 && sorted_keys[j - 1] == key)) return;
  for (int v = lane; v < p.vecs; v += R) {
    acc_t acc[kVec];
#pragma unroll
    for (int e = 0; e < kVec; ++e) acc[e] = acc_t(0);
    for (int64_t t = j; t < contributions && sorted_keys[t] == key; ++t) {
      const int64_t c = order[t];
      const int64_t row = (c / 4) / p.LP;
      const acc_t w = weights[c];
      acc_t g[kVec];
      load_vec<kVec>(grad_out + row * p.D + v * kVec, g);
#pragma unroll
      for (int e = 0; e < kVec; ++e) acc[e] += w * g[e];
    }
    store_vec<kVec>(grad_value + key * p.D + v * kVec, acc);
  }
}

// ---- launch configuration ------------------------------------------------------------------

int next_pow2(int x) {
  int p = 1;
  while (p < x) p *= 2;
  return p;
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

// Channels per vector: the forward loads 16 bytes (4 fp32, 8 fp16 / bf16, 2 fp64); the backward,
// which holds four corners, the output gradient and their products per channel, at most 4
// channels (8-byte loads for fp16 / bf16) to keep its registers in check.
template <typename scalar_t, bool kBackward>
constexpr int wide_vector() {
  constexpr int kBytes16 = 16 / static_cast<int>(sizeof(scalar_t));
  return kBackward && kBytes16 > 4 ? 4 : kBytes16;
}

// The wide vector when D and every pointer allow it, else 1.
template <typename scalar_t, bool kBackward>
int vector_width(int64_t D, std::initializer_list<const void*> ptrs) {
  constexpr int kWide = wide_vector<scalar_t, kBackward>();
  if (D % kWide != 0) return 1;
  for (const void* p : ptrs) {
    if (!aligned16(p)) return 1;
  }
  return kWide;
}

Params make_params(const MSDeformAttnInputs& in, int vec) {
  const MSDeformAttnSizes& sz = in.sz;
  constexpr int64_t kMax32 = std::numeric_limits<int32_t>::max();
  TORCH_CHECK(sz.L <= kMaxLevels, "ms_deform_attn: the CUDA kernels take at most ", kMaxLevels,
              " levels, got ", sz.L);
  TORCH_CHECK(sz.M * sz.D <= kMax32 && sz.Lq <= kMax32 && sz.L * sz.P <= kMax32,
              "ms_deform_attn: M * D, Lq and L * P must each be below 2^31 on CUDA");
  Params p{};
  for (int64_t l = 0; l < sz.L; ++l) {
    const int64_t HW = in.levels.H[l] * in.levels.W[l];
    TORCH_CHECK(HW * sz.M * sz.D <= kMax32, "ms_deform_attn: level ", l,
                " holds H * W * M * D = ", HW * sz.M * sz.D,
                " values, more than the CUDA kernels' 32-bit in-level indexing allows (2^31 - 1)");
    p.H[l] = static_cast<int32_t>(in.levels.H[l]);
    p.W[l] = static_cast<int32_t>(in.levels.W[l]);
    p.start[l] = in.levels.start[l];
  }
  p.rows = sz.N * sz.Lq * sz.M;
  p.S = sz.S;
  p.M = static_cast<int32_t>(sz.M);
  p.D = static_cast<int32_t>(sz.D);
  p.Lq = static_cast<int32_t>(sz.Lq);
  p.P = static_cast<int32_t>(sz.P);
  p.LP = static_cast<int32_t>(sz.L * sz.P);
  p.MD = static_cast<int32_t>(sz.M * sz.D);
  p.vecs = static_cast<int32_t>(sz.D / vec);
  p.lanes = std::min(32, next_pow2(p.vecs));
  return p;
}

unsigned int num_blocks(int64_t groups, int lanes) {
  const int64_t per_block = kThreads / lanes;
  const int64_t blocks = (groups + per_block - 1) / per_block;
  TORCH_CHECK(blocks <= 0x7fffffff, "ms_deform_attn: too many rows (", groups, ") for one launch");
  return static_cast<unsigned int>(std::max<int64_t>(blocks, 1));
}

// Calls fn.template operator()<kVec, kChunks>() for the configuration of p: one pass over the
// channels (kChunks = 1) when a row's vectors fit its lanes, else two vectors per lane.
template <typename scalar_t, bool kBackward, typename Fn>
void with_config(int vec, const Params& p, Fn&& fn) {
  constexpr int kWide = wide_vector<scalar_t, kBackward>();
  const bool one = p.vecs <= p.lanes;
  if (vec == kWide) {
    if (one) return fn.template operator()<kWide, 1>();
    return fn.template operator()<kWide, 2>();
  }
  return fn.template operator()<1, 1>();
}

// The validated inputs, prepared on value's device. The dispatcher picks this kernel when any
// input is on a GPU: prepare_ms_deform_attn names the argument on the wrong device.
MSDeformAttnInputs prepare_on_gpu(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                  const at::Tensor& level_start_index,
                                  const at::Tensor& sampling_locations,
                                  const at::Tensor& attention_weights,
                                  const at::Tensor* grad_output) {
  std::optional<c10::cuda::CUDAGuard> guard;
  if (value.is_cuda()) guard.emplace(value.device());
  MSDeformAttnInputs in = prepare_ms_deform_attn(
      value, spatial_shapes, level_start_index, sampling_locations, attention_weights, grad_output);
  TORCH_CHECK(value.is_cuda(), "ms_deform_attn: the CUDA kernel got value on ", value.device());
  return in;
}

}  // namespace

at::Tensor ms_deform_attn_forward_cuda(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                       const at::Tensor& level_start_index,
                                       const at::Tensor& sampling_locations,
                                       const at::Tensor& attention_weights) {
  const MSDeformAttnInputs in = prepare_on_gpu(value, spatial_shapes, level_start_index,
                                               sampling_locations, attention_weights, nullptr);
  const c10::cuda::CUDAGuard guard(value.device());
  const MSDeformAttnSizes& sz = in.sz;
  at::Tensor out = at::empty({sz.N, sz.Lq, sz.M * sz.D}, value.options());
  if (out.numel() == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_forward_cuda", [&] {
        const int vec = vector_width<scalar_t, false>(sz.D, {in.value.const_data_ptr()});
        const Params p = make_params(in, vec);
        with_config<scalar_t, false>(vec, p, [&]<int kVec, int kChunks>() {
          ms_deform_attn_forward_kernel<scalar_t, kVec, kChunks>
              <<<num_blocks(p.rows, p.lanes), kThreads, 0, stream>>>(
                  p, in.value.const_data_ptr<scalar_t>(), in.loc.const_data_ptr<scalar_t>(),
                  in.attn.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cuda(
    const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations, const at::Tensor& attention_weights,
    const at::Tensor& grad_output, GradMask output_mask) {
  const MSDeformAttnInputs in = prepare_on_gpu(value, spatial_shapes, level_start_index,
                                               sampling_locations, attention_weights, &grad_output);
  const c10::cuda::CUDAGuard guard(value.device());
  const MSDeformAttnSizes& sz = in.sz;
  const auto [want_value, want_loc, want_attn] = output_mask;
  // grad_value is a scatter target; every element of grad_loc / grad_attn is written.
  at::Tensor grad_value = want_value ? at::zeros_like(in.value) : value.new_empty({0});
  at::Tensor grad_loc = want_loc ? at::empty_like(in.loc) : value.new_empty({0});
  at::Tensor grad_attn = want_attn ? at::empty_like(in.attn) : value.new_empty({0});
  const int64_t samples = sz.N * sz.Lq * sz.M * sz.L * sz.P;
  if (samples == 0 || sz.D == 0) {  // empty inputs first: nothing to launch
    grad_loc.zero_();
    grad_attn.zero_();
    return {grad_value, grad_loc, grad_attn};
  }
  if (!want_value && !want_loc && !want_attn) return {grad_value, grad_loc, grad_attn};
  const bool deterministic = at::globalContext().deterministicAlgorithms();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_backward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const int vec = vector_width<scalar_t, true>(
            sz.D, {in.value.const_data_ptr(), in.grad_output.const_data_ptr()});
        const Params p = make_params(in, vec);
        const bool scatter = want_value && !deterministic;
        constexpr bool same = std::is_same_v<acc_t, scalar_t>;
        // fp16 / bf16 atomics are slow and lose precision: scatter into an fp32 buffer.
        at::Tensor grad_acc;
        if (scatter) {
          grad_acc =
              same ? grad_value
                   : at::zeros(in.value.sizes(),
                               in.value.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
        }
        if (scatter || want_loc || want_attn) {
          with_config<scalar_t, true>(vec, p, [&]<int kVec, int kChunks>() {
            ms_deform_attn_backward_kernel<scalar_t, kVec, kChunks>
                <<<num_blocks(p.rows, p.lanes), kThreads, 0, stream>>>(
                    p, in.value.const_data_ptr<scalar_t>(), in.loc.const_data_ptr<scalar_t>(),
                    in.attn.const_data_ptr<scalar_t>(), in.grad_output.const_data_ptr<scalar_t>(),
                    scatter ? grad_acc.data_ptr<acc_t>() : nullptr,
                    want_loc ? grad_loc.data_ptr<scalar_t>() : nullptr,
                    want_attn ? grad_attn.data_ptr<scalar_t>() : nullptr);
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          });
        }
        if (scatter && !same) grad_value.copy_(grad_acc);
        if (want_value && deterministic) {
          const int64_t contributions = 4 * samples;
          at::Tensor keys = at::empty({contributions}, in.value.options().dtype(at::kLong));
          at::Tensor weights = at::empty(
              {contributions}, in.value.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
          const int64_t key_blocks = std::min<int64_t>((samples + kThreads - 1) / kThreads, 65536);
          ms_deform_attn_keys_kernel<scalar_t><<<key_blocks, kThreads, 0, stream>>>(
              p, in.loc.const_data_ptr<scalar_t>(), in.attn.const_data_ptr<scalar_t>(),
              keys.data_ptr<int64_t>(), weights.data_ptr<acc_t>(), samples);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
          // A stable sort keeps the contributions of one value row in (sample, corner) order.
          const auto [sorted_keys, order] = at::sort(keys, /*stable=*/true, 0, false);
          with_config<scalar_t, true>(vec, p, [&]<int kVec, int kChunks>() {
            ms_deform_attn_gather_grad_value_kernel<scalar_t, kVec>
                <<<num_blocks(contributions, p.lanes), kThreads, 0, stream>>>(
                    p, sorted_keys.const_data_ptr<int64_t>(), order.const_data_ptr<int64_t>(),
                    weights.const_data_ptr<acc_t>(), in.grad_output.const_data_ptr<scalar_t>(),
                    grad_value.data_ptr<scalar_t>(), contributions);
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          });
        }
      });
  return {grad_value, grad_loc, grad_attn};
}

TORCH_LIBRARY_IMPL(align_detr, CUDA, m) {
  m.impl("ms_deform_attn_forward", &ms_deform_attn_forward_cuda);
  m.impl("ms_deform_attn_backward", &ms_deform_attn_backward_cuda);
}

}  // namespace align_detr
