// Multi-scale deformable attention: op declarations and input validation shared by the CPU and
// CUDA launchers. The contract (shapes, sampling convention) is in DESIGN.md.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace align_detr {

// Sizes of one call, read off validated inputs.
struct MSDeformAttnSizes {
  int64_t N;   // batch
  int64_t S;   // value rows = sum over levels of H_l * W_l
  int64_t M;   // heads
  int64_t D;   // channels per head
  int64_t Lq;  // queries
  int64_t L;   // levels
  int64_t P;   // points per level
};

// Checks ranks, sizes, dtypes, devices, and that spatial_shapes / level_start_index describe
// exactly S rows (read on the host). Raises a c10::Error naming the offending argument.
MSDeformAttnSizes check_ms_deform_attn_inputs(const at::Tensor& value,
                                              const at::Tensor& spatial_shapes,
                                              const at::Tensor& level_start_index,
                                              const at::Tensor& sampling_locations,
                                              const at::Tensor& attention_weights);

// Checks grad_output of the backward against the forward sizes.
void check_ms_deform_attn_grad_output(const at::Tensor& grad_output, const at::Tensor& value,
                                      const MSDeformAttnSizes& sz);

at::Tensor ms_deform_attn_forward_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                      const at::Tensor& level_start_index,
                                      const at::Tensor& sampling_locations,
                                      const at::Tensor& attention_weights);

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cpu(
    const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights, const at::Tensor& grad_output);

}  // namespace align_detr
