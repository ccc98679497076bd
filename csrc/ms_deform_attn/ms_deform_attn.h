// Multi-scale deformable attention: the validated inputs of one call and the launchers' entry
// points. Schemas and validation are in ms_deform_attn_ops.cpp; the contract (shapes, sampling
// convention) is documented there and in docs/design.md.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <cstdint>
#include <tuple>
#include <vector>

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

// The level table, read and validated on the host: level l covers value rows
// [start[l], start[l] + H[l] * W[l]). Every H * W fits in int32 (the kernels index pixels of one
// level with 32-bit integers).
struct LevelTable {
  std::vector<int64_t> H, W, start;
};

// Validated inputs of one call, made contiguous (the common prologue of the CPU and CUDA
// launchers).
struct MSDeformAttnInputs {
  MSDeformAttnSizes sz;
  LevelTable levels;
  at::Tensor value, loc, attn;
  at::Tensor grad_output;  // backward only
};

// Checks ranks, sizes, dtypes and devices, reads the level table on the host (no device sync
// when spatial_shapes / level_start_index are CPU tensors, the recommended form for CUDA
// inputs; a device-resident table costs one blocking copy) and checks that it describes exactly
// S rows. grad_output is checked when given (backward). Raises a c10::Error naming the
// offending argument.
MSDeformAttnInputs prepare_ms_deform_attn(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                          const at::Tensor& level_start_index,
                                          const at::Tensor& sampling_locations,
                                          const at::Tensor& attention_weights,
                                          const at::Tensor* grad_output);

// Gradients the backward computes: {value, sampling_locations, attention_weights}. A gradient
// that is not asked for comes back as an empty (0-element) tensor.
using GradMask = std::array<bool, 3>;

at::Tensor ms_deform_attn_forward_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                      const at::Tensor& level_start_index,
                                      const at::Tensor& sampling_locations,
                                      const at::Tensor& attention_weights);

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cpu(
    const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations, const at::Tensor& attention_weights,
    const at::Tensor& grad_output, GradMask output_mask);

}  // namespace align_detr
