// CPU launcher of multi-scale deformable attention.
//
// Forward: parallel over (n, m, q) rows in head-major order, so one thread walks consecutive
// queries of one head and its gathers stay in cache. Backward: parallel over (n, m, level)
// tasks; each task owns a disjoint slice grad_value[n, level rows, m, :] and the location /
// attention gradients of its samples, so no atomics are needed and the result is bit-identical
// from run to run. The per-channel inner loops are contiguous and branch-free (corners outside
// the map read from a zero row) so the compiler vectorises them; they are compiled for AVX-512,
// AVX2 and baseline x86-64 and the widest one the CPU supports is picked at run time.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../cpu_isa.h"
#include "ms_deform_attn.h"
#include "ms_deform_attn_math.h"

namespace align_detr {
namespace {

using msda::Bilinear;

template <typename scalar_t>
struct Args {
  const scalar_t* value;     // (N, S, M, D)
  const int64_t* H;          // (L,) level heights
  const int64_t* W;          // (L,) level widths
  const int64_t* starts;     // (L,) first value row of each level
  const scalar_t* loc;       // (N, Lq, M, L, P, 2)
  const scalar_t* attn;      // (N, Lq, M, L, P)
  const scalar_t* grad_out;  // (N, Lq, M, D), backward only
  MSDeformAttnSizes sz;
  // Element strides of value (and grad_value): (N, S, M, D) as given, or (N, M, S, D) when the
  // launcher transposed it so that the pixels of one head are contiguous.
  int64_t batch_stride, pixel_stride, head_stride;
};

// Strides for value laid out (N, S, M, D) (head_major = false) or (N, M, S, D).
template <typename scalar_t>
void set_value_layout(Args<scalar_t>& a, bool head_major) {
  const MSDeformAttnSizes& sz = a.sz;
  a.batch_stride = sz.S * sz.M * sz.D;
  a.pixel_stride = head_major ? sz.D : sz.M * sz.D;
  a.head_stride = head_major ? sz.S * sz.D : sz.D;
}

// The four corner rows of one sample; corners outside the map point at a row of zeros.
template <typename scalar_t>
struct Corners {
  const scalar_t* r[4];
};

template <typename scalar_t, typename acc_t>
ALIGN_DETR_ALWAYS_INLINE Corners<scalar_t> corner_rows(const Bilinear<acc_t>& s,
                                                       const scalar_t* base, int64_t pixel_stride,
                                                       int64_t W, const scalar_t* zero_row) {
  Corners<scalar_t> c;
  if (s.mask == 0xFu) {  // the common case: all four corners inside, no per-corner selects
    c.r[0] = base + static_cast<int64_t>(s.pix0) * pixel_stride;
    c.r[1] = c.r[0] + pixel_stride;
    c.r[2] = c.r[0] + W * pixel_stride;
    c.r[3] = c.r[2] + pixel_stride;
  } else {
    for (int j = 0; j < 4; ++j) {
      const int64_t pix = msda::corner_pixel(s.pix0, j, static_cast<int32_t>(W));
      c.r[j] = (s.mask >> j) & 1u ? base + pix * pixel_stride : zero_row;
    }
  }
  return c;
}

// Channel counts with a compiled-in loop length (fully unrolled, accumulator in registers);
// kAnyD is the generic runtime-length path.
constexpr int kAnyD = 0;

// Forward of rows [begin, end) of the (n, m, q) enumeration into out (N, Lq, M, D).
template <typename scalar_t, int kD>
ALIGN_DETR_ALWAYS_INLINE void forward_rows(const Args<scalar_t>& a, scalar_t* out, int64_t begin,
                                           int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const MSDeformAttnSizes& sz = a.sz;
  const int64_t D = kD != kAnyD ? kD : sz.D, M = sz.M, LP = sz.L * sz.P;
  const int64_t pixel_stride = a.pixel_stride;  // distance between neighbouring pixels of a head
  // A fixed-length accumulator is a local array the compiler keeps in vector registers.
  acc_t acc_fixed[kD != kAnyD ? kD : 1];
  std::vector<acc_t> acc_any(kD != kAnyD ? 0 : D);
  acc_t* __restrict__ acc = kD != kAnyD ? acc_fixed : acc_any.data();
  const std::vector<scalar_t> zero_row(D, scalar_t(0));
  // (n, m, q) of row `begin`, then advanced by counting instead of dividing per row
  int64_t q = begin % sz.Lq, m = (begin / sz.Lq) % M, n = begin / (sz.Lq * M);
  for (int64_t i = begin; i < end; ++i, ++q) {
    if (q == sz.Lq) {
      q = 0;
      if (++m == M) m = 0, ++n;
    }
    const int64_t row = (n * sz.Lq + q) * M + m;  // (n, q, m) row of loc, attn and out
    const scalar_t* loc = a.loc + row * LP * 2;
    const scalar_t* attn = a.attn + row * LP;
    for (int64_t d = 0; d < D; ++d) acc[d] = acc_t(0);
    for (int64_t l = 0; l < sz.L; ++l) {
      const int64_t H = a.H[l], W = a.W[l];
      const scalar_t* base =
          a.value + n * a.batch_stride + m * a.head_stride + a.starts[l] * pixel_stride;
      for (int64_t p = 0; p < sz.P; ++p) {
        const int64_t k = l * sz.P + p;
        Bilinear<acc_t> s;
        if (!msda::bilinear_setup<acc_t>(loc[2 * k], loc[2 * k + 1], static_cast<int32_t>(H),
                                         static_cast<int32_t>(W), s)) {
          continue;
        }
        const Bilinear<acc_t> sw = msda::scale_weights<acc_t>(s, attn[k]);
        const Corners<scalar_t> c = corner_rows(s, base, pixel_stride, W, zero_row.data());
        for (int64_t d = 0; d < D; ++d) {
          acc[d] += msda::bilinear_value<acc_t>(sw, c.r[0][d], c.r[1][d], c.r[2][d], c.r[3][d]);
        }
      }
    }
    scalar_t* o = out + row * D;
    for (int64_t d = 0; d < D; ++d) o[d] = static_cast<scalar_t>(acc[d]);
  }
}

// Backward of tasks [begin, end) of the (n, m, level) enumeration. grad_value is accumulated
// in acc_t (it is grad_value itself for float and double). A null grad_* pointer means that
// gradient was not asked for; its work is skipped.
template <typename scalar_t, int kD>
ALIGN_DETR_ALWAYS_INLINE void backward_tasks(const Args<scalar_t>& a,
                                             at::opmath_type<scalar_t>* grad_value,
                                             scalar_t* grad_loc, scalar_t* grad_attn, int64_t begin,
                                             int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const MSDeformAttnSizes& sz = a.sz;
  const int64_t D = kD != kAnyD ? kD : sz.D, M = sz.M, L = sz.L, P = sz.P, LP = L * P;
  const int64_t pixel_stride = a.pixel_stride;
  const bool want_reduced = grad_loc != nullptr || grad_attn != nullptr;
  const std::vector<scalar_t> zero_row(D, scalar_t(0));
  for (int64_t t = begin; t < end; ++t) {
    const int64_t l = t % L;
    const int64_t m = (t / L) % M;
    const int64_t n = t / (L * M);
    const int64_t H = a.H[l], W = a.W[l];
    const int64_t level_offset =
        n * a.batch_stride + m * a.head_stride + a.starts[l] * pixel_stride;
    const scalar_t* base = a.value + level_offset;
    acc_t* grad_base = grad_value != nullptr ? grad_value + level_offset : nullptr;
    for (int64_t q = 0; q < sz.Lq; ++q) {
      const int64_t row = (n * sz.Lq + q) * M + m;
      const scalar_t* g = a.grad_out + row * D;
      for (int64_t p = 0; p < P; ++p) {
        const int64_t k = row * LP + l * P + p;  // flat (n, q, m, l, p) sample index
        Bilinear<acc_t> s;
        if (!msda::bilinear_setup<acc_t>(a.loc[2 * k], a.loc[2 * k + 1], static_cast<int32_t>(H),
                                         static_cast<int32_t>(W), s)) {
          if (grad_loc != nullptr) grad_loc[2 * k] = grad_loc[2 * k + 1] = scalar_t(0);
          if (grad_attn != nullptr) grad_attn[k] = scalar_t(0);
          continue;
        }
        const acc_t w = a.attn[k];
        if (want_reduced) {
          const Corners<scalar_t> c = corner_rows(s, base, pixel_stride, W, zero_row.data());
          const scalar_t* c0 = c.r[0];
          const scalar_t* c1 = c.r[1];
          const scalar_t* c2 = c.r[2];
          const scalar_t* c3 = c.r[3];
          acc_t ga = 0, gx = 0, gy = 0;
#pragma omp simd reduction(+ : ga, gx, gy)
          for (int64_t d = 0; d < D; ++d) {
            msda::bilinear_backward<acc_t>(s, c0[d], c1[d], c2[d], c3[d], static_cast<acc_t>(g[d]),
                                           ga, gx, gy);
          }
          if (grad_attn != nullptr) grad_attn[k] = static_cast<scalar_t>(ga);
          if (grad_loc != nullptr) {
            grad_loc[2 * k] = static_cast<scalar_t>(
                msda::location_gradient<acc_t>(gx, w, static_cast<int32_t>(W)));
            grad_loc[2 * k + 1] = static_cast<scalar_t>(
                msda::location_gradient<acc_t>(gy, w, static_cast<int32_t>(H)));
          }
        }
        if (grad_base == nullptr) continue;
        const Bilinear<acc_t> sw = msda::scale_weights<acc_t>(s, w);
        for (int j = 0; j < 4; ++j) {
          if (!((s.mask >> j) & 1u)) continue;
          const int64_t pix = msda::corner_pixel(s.pix0, j, static_cast<int32_t>(W));
          acc_t* __restrict__ gv = grad_base + pix * pixel_stride;
          const acc_t cw = sw.weight[j];
          for (int64_t d = 0; d < D; ++d) gv[d] += cw * static_cast<acc_t>(g[d]);
        }
      }
    }
  }
}

// ---- instruction-set variants -------------------------------------------------------------

using cpu::Isa;
using cpu::pick_isa;

#ifdef ALIGN_DETR_X86_MULTIVERSION

template <typename scalar_t, int kD>
ALIGN_DETR_TARGET_AVX2 void forward_rows_avx2(const Args<scalar_t>& a, scalar_t* out, int64_t b,
                                              int64_t e) {
  forward_rows<scalar_t, kD>(a, out, b, e);
}
template <typename scalar_t, int kD>
ALIGN_DETR_TARGET_AVX512 void forward_rows_avx512(const Args<scalar_t>& a, scalar_t* out, int64_t b,
                                                  int64_t e) {
  forward_rows<scalar_t, kD>(a, out, b, e);
}
template <typename scalar_t, int kD>
ALIGN_DETR_TARGET_AVX2 void backward_tasks_avx2(const Args<scalar_t>& a,
                                                at::opmath_type<scalar_t>* gv, scalar_t* gl,
                                                scalar_t* ga, int64_t b, int64_t e) {
  backward_tasks<scalar_t, kD>(a, gv, gl, ga, b, e);
}
template <typename scalar_t, int kD>
ALIGN_DETR_TARGET_AVX512 void backward_tasks_avx512(const Args<scalar_t>& a,
                                                    at::opmath_type<scalar_t>* gv, scalar_t* gl,
                                                    scalar_t* ga, int64_t b, int64_t e) {
  backward_tasks<scalar_t, kD>(a, gv, gl, ga, b, e);
}
#endif

template <typename scalar_t, int kD>
void run_forward_d(Isa isa, const Args<scalar_t>& a, scalar_t* out, int64_t b, int64_t e) {
#ifdef ALIGN_DETR_X86_MULTIVERSION
  if (isa == Isa::kAvx512) return forward_rows_avx512<scalar_t, kD>(a, out, b, e);
  if (isa == Isa::kAvx2) return forward_rows_avx2<scalar_t, kD>(a, out, b, e);
#endif
  forward_rows<scalar_t, kD>(a, out, b, e);
}

template <typename scalar_t, int kD>
void run_backward_d(Isa isa, const Args<scalar_t>& a, at::opmath_type<scalar_t>* gv, scalar_t* gl,
                    scalar_t* ga, int64_t b, int64_t e) {
#ifdef ALIGN_DETR_X86_MULTIVERSION
  if (isa == Isa::kAvx512) return backward_tasks_avx512<scalar_t, kD>(a, gv, gl, ga, b, e);
  if (isa == Isa::kAvx2) return backward_tasks_avx2<scalar_t, kD>(a, gv, gl, ga, b, e);
#endif
  backward_tasks<scalar_t, kD>(a, gv, gl, ga, b, e);
}

// Common head widths (d_model / n_heads) get a fixed-length channel loop; fp32 only, the dtype
// that trains (the others take the generic path).
template <typename scalar_t>
void run_forward(Isa isa, const Args<scalar_t>& a, scalar_t* out, int64_t b, int64_t e) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (a.sz.D == 32) return run_forward_d<scalar_t, 32>(isa, a, out, b, e);
    if (a.sz.D == 16) return run_forward_d<scalar_t, 16>(isa, a, out, b, e);
    if (a.sz.D == 64) return run_forward_d<scalar_t, 64>(isa, a, out, b, e);
  }
  run_forward_d<scalar_t, kAnyD>(isa, a, out, b, e);
}

template <typename scalar_t>
void run_backward(Isa isa, const Args<scalar_t>& a, at::opmath_type<scalar_t>* gv, scalar_t* gl,
                  scalar_t* ga, int64_t b, int64_t e) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (a.sz.D == 32) return run_backward_d<scalar_t, 32>(isa, a, gv, gl, ga, b, e);
    if (a.sz.D == 16) return run_backward_d<scalar_t, 16>(isa, a, gv, gl, ga, b, e);
    if (a.sz.D == 64) return run_backward_d<scalar_t, 64>(isa, a, gv, gl, ga, b, e);
  }
  run_backward_d<scalar_t, kAnyD>(isa, a, gv, gl, ga, b, e);
}

// Transposing value to (N, M, S, D) costs two passes over it but makes every head's pixels
// contiguous (fewer cache lines and TLB pages per gather). It pays when each value row is
// gathered several times, as in the encoder (Lq = S), not in the decoder (Lq << S).
bool use_head_major(const MSDeformAttnSizes& sz) {
  const char* env = std::getenv("ALIGN_DETR_MSDA_LAYOUT");
  if (env != nullptr && std::strcmp(env, "as_given") == 0) return false;
  if (env != nullptr && std::strcmp(env, "head_major") == 0) return sz.M > 1;
  return sz.M > 1 && sz.Lq * sz.L * sz.P >= 2 * sz.S;
}

void check_cpu(const at::Tensor& value) {
  TORCH_CHECK(value.device().is_cpu(), "ms_deform_attn: the CPU kernel got value on ",
              value.device(),
              " (spatial_shapes / level_start_index on a GPU need value there too)");
}

// Kernel arguments of one call; vt is in.value, or its (N, M, S, D) copy when head_major.
template <typename scalar_t>
Args<scalar_t> make_args(const MSDeformAttnInputs& in, const at::Tensor& vt, bool head_major) {
  Args<scalar_t> a{};
  a.value = vt.const_data_ptr<scalar_t>();
  a.H = in.levels.H.data();
  a.W = in.levels.W.data();
  a.starts = in.levels.start.data();
  a.loc = in.loc.const_data_ptr<scalar_t>();
  a.attn = in.attn.const_data_ptr<scalar_t>();
  a.grad_out = nullptr;
  a.sz = in.sz;
  set_value_layout(a, head_major);
  return a;
}

}  // namespace

at::Tensor ms_deform_attn_forward_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                      const at::Tensor& level_start_index,
                                      const at::Tensor& sampling_locations,
                                      const at::Tensor& attention_weights) {
  check_cpu(value);
  const MSDeformAttnInputs in = prepare_ms_deform_attn(
      value, spatial_shapes, level_start_index, sampling_locations, attention_weights, nullptr);
  const MSDeformAttnSizes& sz = in.sz;
  at::Tensor out = at::empty({sz.N, sz.Lq, sz.M * sz.D}, value.options());
  if (out.numel() == 0) return out;
  const Isa isa = pick_isa();
  const bool head_major = use_head_major(sz);
  const at::Tensor vt = head_major ? in.value.permute({0, 2, 1, 3}).contiguous() : in.value;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_forward_cpu", [&] {
        Args<scalar_t> a = make_args<scalar_t>(in, vt, head_major);
        scalar_t* o = out.data_ptr<scalar_t>();
        // One row is L * P samples of D channels; aim for chunks of a few thousand samples.
        const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, sz.L * sz.P));
        at::parallel_for(0, sz.N * sz.M * sz.Lq, grain,
                         [&](int64_t b, int64_t e) { run_forward<scalar_t>(isa, a, o, b, e); });
      });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cpu(
    const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations, const at::Tensor& attention_weights,
    const at::Tensor& grad_output, GradMask output_mask) {
  check_cpu(value);
  const MSDeformAttnInputs in =
      prepare_ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations,
                             attention_weights, &grad_output);
  const MSDeformAttnSizes& sz = in.sz;
  const auto [want_value, want_loc, want_attn] = output_mask;
  // Every element of grad_loc / grad_attn is written; grad_value is a scatter target.
  at::Tensor grad_value = want_value ? at::zeros_like(in.value) : value.new_empty({0});
  at::Tensor grad_loc = want_loc ? at::empty_like(in.loc) : value.new_empty({0});
  at::Tensor grad_attn = want_attn ? at::empty_like(in.attn) : value.new_empty({0});
  if (sz.N * sz.Lq * sz.M * sz.L * sz.P == 0 || sz.D == 0) {
    grad_loc.zero_();
    grad_attn.zero_();
    return {grad_value, grad_loc, grad_attn};
  }
  if (!want_value && !want_loc && !want_attn) return {grad_value, grad_loc, grad_attn};
  const Isa isa = pick_isa();
  const bool head_major = use_head_major(sz);
  const at::Tensor vt = head_major ? in.value.permute({0, 2, 1, 3}).contiguous() : in.value;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_backward_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        Args<scalar_t> a = make_args<scalar_t>(in, vt, head_major);
        a.grad_out = in.grad_output.const_data_ptr<scalar_t>();
        // grad_value is accumulated in vt's layout; reduced precision accumulates in fp32.
        constexpr bool same = std::is_same_v<acc_t, scalar_t>;
        at::Tensor grad_acc;
        if (want_value) {
          grad_acc = same && !head_major
                         ? grad_value
                         : at::zeros(vt.sizes(),
                                     vt.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
        }
        acc_t* gv = want_value ? grad_acc.data_ptr<acc_t>() : nullptr;
        scalar_t* gl = want_loc ? grad_loc.data_ptr<scalar_t>() : nullptr;
        scalar_t* ga = want_attn ? grad_attn.data_ptr<scalar_t>() : nullptr;
        at::parallel_for(0, sz.N * sz.M * sz.L, 1, [&](int64_t b, int64_t e) {
          run_backward<scalar_t>(isa, a, gv, gl, ga, b, e);
        });
        if (want_value && head_major) {
          grad_value.copy_(grad_acc.permute({0, 2, 1, 3}));
        } else if (want_value && !same) {
          grad_value.copy_(grad_acc);
        }
      });
  return {grad_value, grad_loc, grad_attn};
}

TORCH_LIBRARY_IMPL(align_detr, CPU, m) {
  m.impl("ms_deform_attn_forward", &ms_deform_attn_forward_cpu);
  m.impl("ms_deform_attn_backward", &ms_deform_attn_backward_cpu);
}

}  // namespace align_detr
