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

#include "ms_deform_attn.h"
#include "ms_deform_attn_math.h"

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#define ALIGN_DETR_X86_MULTIVERSION 1
#define ALIGN_DETR_ALWAYS_INLINE __attribute__((always_inline)) inline
#else
#define ALIGN_DETR_ALWAYS_INLINE inline
#endif

namespace align_detr {
namespace {

using msda::Bilinear;

template <typename scalar_t>
struct Args {
  const scalar_t* value;   // (N, S, M, D)
  const int64_t* shapes;   // (L, 2)
  const int64_t* starts;   // (L,)
  const scalar_t* loc;     // (N, Lq, M, L, P, 2)
  const scalar_t* attn;    // (N, Lq, M, L, P)
  const scalar_t* grad_out;  // (N, Lq, M, D), backward only
  MSDeformAttnSizes sz;
};

// Forward of rows [begin, end) of the (n, m, q) enumeration into out (N, Lq, M, D).
template <typename scalar_t>
ALIGN_DETR_ALWAYS_INLINE void forward_rows(const Args<scalar_t>& a, scalar_t* out, int64_t begin,
                                           int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const MSDeformAttnSizes& sz = a.sz;
  const int64_t D = sz.D, M = sz.M, LP = sz.L * sz.P;
  const int64_t pixel_stride = M * D;  // distance between neighbouring pixels of one head
  std::vector<acc_t> acc_buf(D);
  const std::vector<scalar_t> zero_row(D, scalar_t(0));
  acc_t* __restrict__ acc = acc_buf.data();
  for (int64_t i = begin; i < end; ++i) {
    const int64_t q = i % sz.Lq;
    const int64_t m = (i / sz.Lq) % M;
    const int64_t n = i / (sz.Lq * M);
    const int64_t row = (n * sz.Lq + q) * M + m;  // (n, q, m) row of loc, attn and out
    const scalar_t* loc = a.loc + row * LP * 2;
    const scalar_t* attn = a.attn + row * LP;
    for (int64_t d = 0; d < D; ++d) acc[d] = acc_t(0);
    for (int64_t l = 0; l < sz.L; ++l) {
      const int64_t H = a.shapes[2 * l], W = a.shapes[2 * l + 1];
      const scalar_t* base = a.value + (n * sz.S + a.starts[l]) * pixel_stride + m * D;
      for (int64_t p = 0; p < sz.P; ++p) {
        const int64_t k = l * sz.P + p;
        Bilinear<acc_t> s;
        if (!msda::bilinear_setup<acc_t>(loc[2 * k], loc[2 * k + 1], H, W, s)) continue;
        const Bilinear<acc_t> sw = msda::scale_weights<acc_t>(s, attn[k]);
        const scalar_t* c[4];
        for (int j = 0; j < 4; ++j) {
          c[j] = s.pixel[j] >= 0 ? base + s.pixel[j] * pixel_stride : zero_row.data();
        }
        const scalar_t* c0 = c[0];
        const scalar_t* c1 = c[1];
        const scalar_t* c2 = c[2];
        const scalar_t* c3 = c[3];
        for (int64_t d = 0; d < D; ++d) {
          acc[d] += msda::bilinear_value<acc_t>(sw, c0[d], c1[d], c2[d], c3[d]);
        }
      }
    }
    scalar_t* o = out + row * D;
    for (int64_t d = 0; d < D; ++d) o[d] = static_cast<scalar_t>(acc[d]);
  }
}

// Backward of tasks [begin, end) of the (n, m, level) enumeration. grad_value is accumulated
// in acc_t (it is grad_value itself for float and double).
template <typename scalar_t>
ALIGN_DETR_ALWAYS_INLINE void backward_tasks(const Args<scalar_t>& a,
                                             at::opmath_type<scalar_t>* grad_value,
                                             scalar_t* grad_loc, scalar_t* grad_attn,
                                             int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const MSDeformAttnSizes& sz = a.sz;
  const int64_t D = sz.D, M = sz.M, L = sz.L, P = sz.P, LP = L * P;
  const int64_t pixel_stride = M * D;
  const std::vector<scalar_t> zero_row(D, scalar_t(0));
  for (int64_t t = begin; t < end; ++t) {
    const int64_t l = t % L;
    const int64_t m = (t / L) % M;
    const int64_t n = t / (L * M);
    const int64_t H = a.shapes[2 * l], W = a.shapes[2 * l + 1];
    const int64_t level_offset = (n * sz.S + a.starts[l]) * pixel_stride + m * D;
    const scalar_t* base = a.value + level_offset;
    acc_t* grad_base = grad_value + level_offset;
    for (int64_t q = 0; q < sz.Lq; ++q) {
      const int64_t row = (n * sz.Lq + q) * M + m;
      const scalar_t* g = a.grad_out + row * D;
      for (int64_t p = 0; p < P; ++p) {
        const int64_t k = row * LP + l * P + p;  // flat (n, q, m, l, p) sample index
        Bilinear<acc_t> s;
        if (!msda::bilinear_setup<acc_t>(a.loc[2 * k], a.loc[2 * k + 1], H, W, s)) {
          grad_loc[2 * k] = grad_loc[2 * k + 1] = grad_attn[k] = scalar_t(0);
          continue;
        }
        const acc_t w = a.attn[k];
        const scalar_t* c[4];
        for (int j = 0; j < 4; ++j) {
          c[j] = s.pixel[j] >= 0 ? base + s.pixel[j] * pixel_stride : zero_row.data();
        }
        const scalar_t* c0 = c[0];
        const scalar_t* c1 = c[1];
        const scalar_t* c2 = c[2];
        const scalar_t* c3 = c[3];
        acc_t ga = 0, gx = 0, gy = 0;
#pragma omp simd reduction(+ : ga, gx, gy)
        for (int64_t d = 0; d < D; ++d) {
          msda::bilinear_backward<acc_t>(s, c0[d], c1[d], c2[d], c3[d], static_cast<acc_t>(g[d]),
                                         ga, gx, gy);
        }
        grad_attn[k] = static_cast<scalar_t>(ga);
        grad_loc[2 * k] = static_cast<scalar_t>(gx * w * static_cast<acc_t>(W));
        grad_loc[2 * k + 1] = static_cast<scalar_t>(gy * w * static_cast<acc_t>(H));
        const Bilinear<acc_t> sw = msda::scale_weights<acc_t>(s, w);
        for (int j = 0; j < 4; ++j) {
          if (s.pixel[j] < 0) continue;
          acc_t* __restrict__ gv = grad_base + s.pixel[j] * pixel_stride;
          const acc_t cw = sw.weight[j];
          for (int64_t d = 0; d < D; ++d) gv[d] += cw * static_cast<acc_t>(g[d]);
        }
      }
    }
  }
}

// ---- instruction-set variants -------------------------------------------------------------

enum class Isa { kBaseline, kAvx2, kAvx512 };

// The widest variant this CPU runs; ALIGN_DETR_CPU_ISA=baseline|avx2|avx512 narrows it (tests
// use this to check every variant against the reference).
Isa pick_isa() {
#ifdef ALIGN_DETR_X86_MULTIVERSION
  Isa best = Isa::kBaseline;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = Isa::kAvx2;
  if (best == Isa::kAvx2 && __builtin_cpu_supports("avx512f") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw")) {
    best = Isa::kAvx512;
  }
  const char* env = std::getenv("ALIGN_DETR_CPU_ISA");
  if (env != nullptr) {
    if (std::strcmp(env, "baseline") == 0) return Isa::kBaseline;
    if (std::strcmp(env, "avx2") == 0 && best != Isa::kBaseline) return Isa::kAvx2;
  }
  return best;
#else
  return Isa::kBaseline;
#endif
}

#ifdef ALIGN_DETR_X86_MULTIVERSION
#define ALIGN_DETR_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define ALIGN_DETR_TARGET_AVX512 __attribute__((target("avx512f,avx512vl,avx512bw,avx2,fma")))

template <typename scalar_t>
ALIGN_DETR_TARGET_AVX2 void forward_rows_avx2(const Args<scalar_t>& a, scalar_t* out, int64_t b,
                                              int64_t e) {
  forward_rows<scalar_t>(a, out, b, e);
}
template <typename scalar_t>
ALIGN_DETR_TARGET_AVX512 void forward_rows_avx512(const Args<scalar_t>& a, scalar_t* out,
                                                  int64_t b, int64_t e) {
  forward_rows<scalar_t>(a, out, b, e);
}
template <typename scalar_t>
ALIGN_DETR_TARGET_AVX2 void backward_tasks_avx2(const Args<scalar_t>& a,
                                                at::opmath_type<scalar_t>* gv, scalar_t* gl,
                                                scalar_t* ga, int64_t b, int64_t e) {
  backward_tasks<scalar_t>(a, gv, gl, ga, b, e);
}
template <typename scalar_t>
ALIGN_DETR_TARGET_AVX512 void backward_tasks_avx512(const Args<scalar_t>& a,
                                                    at::opmath_type<scalar_t>* gv, scalar_t* gl,
                                                    scalar_t* ga, int64_t b, int64_t e) {
  backward_tasks<scalar_t>(a, gv, gl, ga, b, e);
}
#endif

template <typename scalar_t>
void run_forward(Isa isa, const Args<scalar_t>& a, scalar_t* out, int64_t b, int64_t e) {
#ifdef ALIGN_DETR_X86_MULTIVERSION
  if (isa == Isa::kAvx512) return forward_rows_avx512<scalar_t>(a, out, b, e);
  if (isa == Isa::kAvx2) return forward_rows_avx2<scalar_t>(a, out, b, e);
#endif
  forward_rows<scalar_t>(a, out, b, e);
}

template <typename scalar_t>
void run_backward(Isa isa, const Args<scalar_t>& a, at::opmath_type<scalar_t>* gv, scalar_t* gl,
                  scalar_t* ga, int64_t b, int64_t e) {
#ifdef ALIGN_DETR_X86_MULTIVERSION
  if (isa == Isa::kAvx512) return backward_tasks_avx512<scalar_t>(a, gv, gl, ga, b, e);
  if (isa == Isa::kAvx2) return backward_tasks_avx2<scalar_t>(a, gv, gl, ga, b, e);
#endif
  backward_tasks<scalar_t>(a, gv, gl, ga, b, e);
}

void check_cpu(const at::Tensor& value) {
  TORCH_CHECK(value.device().is_cpu(), "ms_deform_attn CPU kernel got a tensor on ",
              value.device());
}

}  // namespace

at::Tensor ms_deform_attn_forward_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                      const at::Tensor& level_start_index,
                                      const at::Tensor& sampling_locations,
                                      const at::Tensor& attention_weights) {
  const MSDeformAttnSizes sz = check_ms_deform_attn_inputs(
      value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  check_cpu(value);
  const at::Tensor v = value.contiguous(), shapes = spatial_shapes.contiguous(),
                   starts = level_start_index.contiguous(), loc = sampling_locations.contiguous(),
                   attn = attention_weights.contiguous();
  at::Tensor out = at::empty({sz.N, sz.Lq, sz.M * sz.D}, value.options());
  if (out.numel() == 0) return out;
  const Isa isa = pick_isa();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_forward_cpu", [&] {
        const Args<scalar_t> a{v.const_data_ptr<scalar_t>(),    shapes.const_data_ptr<int64_t>(),
                               starts.const_data_ptr<int64_t>(), loc.const_data_ptr<scalar_t>(),
                               attn.const_data_ptr<scalar_t>(),  nullptr,
                               sz};
        scalar_t* o = out.data_ptr<scalar_t>();
        // One row is L * P samples of D channels; aim for chunks of a few thousand samples.
        const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, sz.L * sz.P));
        at::parallel_for(0, sz.N * sz.M * sz.Lq, grain,
                         [&](int64_t b, int64_t e) { run_forward<scalar_t>(isa, a, o, b, e); });
      });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cpu(
    const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights, const at::Tensor& grad_output) {
  const MSDeformAttnSizes sz = check_ms_deform_attn_inputs(
      value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  check_ms_deform_attn_grad_output(grad_output, value, sz);
  check_cpu(value);
  const at::Tensor v = value.contiguous(), shapes = spatial_shapes.contiguous(),
                   starts = level_start_index.contiguous(), loc = sampling_locations.contiguous(),
                   attn = attention_weights.contiguous(), gout = grad_output.contiguous();
  at::Tensor grad_value = at::zeros_like(v);
  at::Tensor grad_loc = at::empty_like(loc);
  at::Tensor grad_attn = at::empty_like(attn);
  if (grad_loc.numel() == 0 || sz.D == 0) {
    grad_loc.zero_();
    grad_attn.zero_();
    return {grad_value, grad_loc, grad_attn};
  }
  const Isa isa = pick_isa();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_backward_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const Args<scalar_t> a{v.const_data_ptr<scalar_t>(),    shapes.const_data_ptr<int64_t>(),
                               starts.const_data_ptr<int64_t>(), loc.const_data_ptr<scalar_t>(),
                               attn.const_data_ptr<scalar_t>(),  gout.const_data_ptr<scalar_t>(),
                               sz};
        // Reduced-precision grad_value accumulates in fp32 and is cast once at the end.
        constexpr bool same = std::is_same_v<acc_t, scalar_t>;
        at::Tensor grad_acc = same ? grad_value : at::zeros(v.sizes(), v.options().dtype(
                                                                          c10::CppTypeToScalarType<acc_t>::value));
        acc_t* gv = grad_acc.data_ptr<acc_t>();
        scalar_t* gl = grad_loc.data_ptr<scalar_t>();
        scalar_t* ga = grad_attn.data_ptr<scalar_t>();
        at::parallel_for(0, sz.N * sz.M * sz.L, 1, [&](int64_t b, int64_t e) {
          run_backward<scalar_t>(isa, a, gv, gl, ga, b, e);
        });
        if (!same) grad_value.copy_(grad_acc);
      });
  return {grad_value, grad_loc, grad_attn};
}

TORCH_LIBRARY_IMPL(align_detr, CPU, m) {
  m.impl("ms_deform_attn_forward", &ms_deform_attn_forward_cpu);
  m.impl("ms_deform_attn_backward", &ms_deform_attn_backward_cpu);
}

}  // namespace align_detr
