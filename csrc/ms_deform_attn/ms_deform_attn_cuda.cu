// CUDA launcher of multi-scale deformable attention.
//
// One warp per (n, q, m) row; lane i owns channels i, i + 32, ... so corner rows are read as
// coalesced D-element runs. The per-sample setup and the per-channel arithmetic are the
// functions of ms_deform_attn_math.h that the CPU launcher uses too. The backward reduces the
// location and attention gradients over channels with warp shuffles (one writer per element)
// and scatters grad_value with atomics into an opmath (fp32 for fp16/bf16) buffer; that scatter
// is not bit-deterministic, so it raises under torch.use_deterministic_algorithms(True).
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/Atomic.cuh>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <type_traits>

#include "ms_deform_attn.h"
#include "ms_deform_attn_math.h"

namespace align_detr {
namespace {

using msda::Bilinear;

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 4;

struct KernelSizes {
  int64_t rows;  // N * Lq * M
  int64_t S, M, D, Lq, L, P;
};

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Corner c of a sample for channel d, or 0 when the corner lies outside the map.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t corner(const scalar_t* base, const Bilinear<acc_t>& s, int c,
                                        int64_t pixel_stride, int64_t d) {
  return s.pixel[c] >= 0 ? static_cast<acc_t>(base[s.pixel[c] * pixel_stride + d]) : acc_t(0);
}

template <typename scalar_t>
__global__ void ms_deform_attn_forward_kernel(const scalar_t* __restrict__ value,
                                              const int64_t* __restrict__ shapes,
                                              const int64_t* __restrict__ starts,
                                              const scalar_t* __restrict__ loc,
                                              const scalar_t* __restrict__ attn,
                                              scalar_t* __restrict__ out, KernelSizes k) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (row >= k.rows) return;  // the whole warp leaves together
  const int64_t m = row % k.M;
  const int64_t n = row / (k.M * k.Lq);
  const int64_t LP = k.L * k.P;
  const int64_t pixel_stride = k.M * k.D;
  const scalar_t* row_loc = loc + row * LP * 2;
  const scalar_t* row_attn = attn + row * LP;
  for (int64_t d = lane; d < k.D; d += kWarp) {
    acc_t acc = 0;
    for (int64_t l = 0; l < k.L; ++l) {
      const int64_t H = shapes[2 * l], W = shapes[2 * l + 1];
      const scalar_t* base = value + (n * k.S + starts[l]) * pixel_stride + m * k.D;
      for (int64_t p = 0; p < k.P; ++p) {
        const int64_t i = l * k.P + p;
        Bilinear<acc_t> s;
        if (!msda::bilinear_setup<acc_t>(static_cast<acc_t>(row_loc[2 * i]),
                                         static_cast<acc_t>(row_loc[2 * i + 1]), H, W, s)) {
          continue;
        }
        const Bilinear<acc_t> sw = msda::scale_weights<acc_t>(s, static_cast<acc_t>(row_attn[i]));
        acc += msda::bilinear_value<acc_t>(
            sw, corner<scalar_t, acc_t>(base, s, 0, pixel_stride, d),
            corner<scalar_t, acc_t>(base, s, 1, pixel_stride, d),
            corner<scalar_t, acc_t>(base, s, 2, pixel_stride, d),
            corner<scalar_t, acc_t>(base, s, 3, pixel_stride, d));
      }
    }
    out[row * k.D + d] = static_cast<scalar_t>(acc);
  }
}

template <typename scalar_t>
__global__ void ms_deform_attn_backward_kernel(
    const scalar_t* __restrict__ value, const int64_t* __restrict__ shapes,
    const int64_t* __restrict__ starts, const scalar_t* __restrict__ loc,
    const scalar_t* __restrict__ attn, const scalar_t* __restrict__ grad_out,
    at::opmath_type<scalar_t>* __restrict__ grad_value, scalar_t* __restrict__ grad_loc,
    scalar_t* __restrict__ grad_attn, KernelSizes k) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (row >= k.rows) return;
  const int64_t m = row % k.M;
  const int64_t n = row / (k.M * k.Lq);
  const int64_t LP = k.L * k.P;
  const int64_t pixel_stride = k.M * k.D;
  const scalar_t* g = grad_out + row * k.D;
  for (int64_t l = 0; l < k.L; ++l) {
    const int64_t H = shapes[2 * l], W = shapes[2 * l + 1];
    const int64_t level_offset = (n * k.S + starts[l]) * pixel_stride + m * k.D;
    const scalar_t* base = value + level_offset;
    acc_t* grad_base = grad_value + level_offset;
    for (int64_t p = 0; p < k.P; ++p) {
      const int64_t i = row * LP + l * k.P + p;
      Bilinear<acc_t> s;
      // Every lane evaluates the same sample, so the branch and the shuffles are warp-uniform.
      if (!msda::bilinear_setup<acc_t>(static_cast<acc_t>(loc[2 * i]),
                                       static_cast<acc_t>(loc[2 * i + 1]), H, W, s)) {
        if (lane == 0) grad_loc[2 * i] = grad_loc[2 * i + 1] = grad_attn[i] = scalar_t(0);
        continue;
      }
      const acc_t w = static_cast<acc_t>(attn[i]);
      const Bilinear<acc_t> sw = msda::scale_weights<acc_t>(s, w);
      acc_t ga = 0, gx = 0, gy = 0;
      for (int64_t d = lane; d < k.D; d += kWarp) {
        const acc_t gd = static_cast<acc_t>(g[d]);
        msda::bilinear_backward<acc_t>(s, corner<scalar_t, acc_t>(base, s, 0, pixel_stride, d),
                                       corner<scalar_t, acc_t>(base, s, 1, pixel_stride, d),
                                       corner<scalar_t, acc_t>(base, s, 2, pixel_stride, d),
                                       corner<scalar_t, acc_t>(base, s, 3, pixel_stride, d), gd,
                                       ga, gx, gy);
        for (int c = 0; c < 4; ++c) {
          if (s.pixel[c] >= 0) gpuAtomicAdd(grad_base + s.pixel[c] * pixel_stride + d, sw.weight[c] * gd);
        }
      }
      ga = warp_sum(ga);
      gx = warp_sum(gx);
      gy = warp_sum(gy);
      if (lane == 0) {
        grad_attn[i] = static_cast<scalar_t>(ga);
        grad_loc[2 * i] = static_cast<scalar_t>(gx * w * static_cast<acc_t>(W));
        grad_loc[2 * i + 1] = static_cast<scalar_t>(gy * w * static_cast<acc_t>(H));
      }
    }
  }
}

KernelSizes kernel_sizes(const MSDeformAttnSizes& sz) {
  return KernelSizes{sz.N * sz.Lq * sz.M, sz.S, sz.M, sz.D, sz.Lq, sz.L, sz.P};
}

unsigned int num_blocks(int64_t rows) {
  const int64_t blocks = (rows + kWarpsPerBlock - 1) / kWarpsPerBlock;
  TORCH_CHECK(blocks <= 0x7fffffff, "ms_deform_attn: too many rows (", rows, ") for one launch");
  return static_cast<unsigned int>(blocks);
}

}  // namespace

at::Tensor ms_deform_attn_forward_cuda(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                       const at::Tensor& level_start_index,
                                       const at::Tensor& sampling_locations,
                                       const at::Tensor& attention_weights) {
  const MSDeformAttnSizes sz = check_ms_deform_attn_inputs(
      value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  const c10::cuda::CUDAGuard guard(value.device());
  const at::Tensor v = value.contiguous(), shapes = spatial_shapes.contiguous(),
                   starts = level_start_index.contiguous(), loc = sampling_locations.contiguous(),
                   attn = attention_weights.contiguous();
  at::Tensor out = at::empty({sz.N, sz.Lq, sz.M * sz.D}, value.options());
  if (out.numel() == 0) return out;
  const KernelSizes k = kernel_sizes(sz);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_forward_cuda", [&] {
        ms_deform_attn_forward_kernel<scalar_t>
            <<<num_blocks(k.rows), kWarp * kWarpsPerBlock, 0, stream>>>(
                v.const_data_ptr<scalar_t>(), shapes.const_data_ptr<int64_t>(),
                starts.const_data_ptr<int64_t>(), loc.const_data_ptr<scalar_t>(),
                attn.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), k);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cuda(
    const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights, const at::Tensor& grad_output) {
  const MSDeformAttnSizes sz = check_ms_deform_attn_inputs(
      value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  check_ms_deform_attn_grad_output(grad_output, value, sz);
  at::globalContext().alertNotDeterministic("ms_deform_attn_backward_cuda");
  const c10::cuda::CUDAGuard guard(value.device());
  const at::Tensor v = value.contiguous(), shapes = spatial_shapes.contiguous(),
                   starts = level_start_index.contiguous(), loc = sampling_locations.contiguous(),
                   attn = attention_weights.contiguous(), gout = grad_output.contiguous();
  at::Tensor grad_value = at::zeros_like(v);
  at::Tensor grad_loc = at::zeros_like(loc);
  at::Tensor grad_attn = at::zeros_like(attn);
  if (grad_loc.numel() == 0 || sz.D == 0) return {grad_value, grad_loc, grad_attn};
  const KernelSizes k = kernel_sizes(sz);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_backward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        constexpr bool same = std::is_same_v<acc_t, scalar_t>;
        // fp16/bf16 atomics are slow and lose precision: scatter into an fp32 buffer instead.
        at::Tensor grad_acc =
            same ? grad_value
                 : at::zeros(v.sizes(), v.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
        ms_deform_attn_backward_kernel<scalar_t>
            <<<num_blocks(k.rows), kWarp * kWarpsPerBlock, 0, stream>>>(
                v.const_data_ptr<scalar_t>(), shapes.const_data_ptr<int64_t>(),
                starts.const_data_ptr<int64_t>(), loc.const_data_ptr<scalar_t>(),
                attn.const_data_ptr<scalar_t>(), gout.const_data_ptr<scalar_t>(),
                grad_acc.data_ptr<acc_t>(), grad_loc.data_ptr<scalar_t>(),
                grad_attn.data_ptr<scalar_t>(), k);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        if (!same) grad_value.copy_(grad_acc);
      });
  return {grad_value, grad_loc, grad_attn};
}

TORCH_LIBRARY_IMPL(align_detr, CUDA, m) {
  m.impl("ms_deform_attn_forward", &ms_deform_attn_forward_cuda);
  m.impl("ms_deform_attn_backward", &ms_deform_attn_backward_cuda);
}

}  // namespace align_detr
