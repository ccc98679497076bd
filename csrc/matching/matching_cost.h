// DETR matching cost of a whole batch: the validated inputs of one call and the launchers'
// entry points. The schema and the validation are in matching_cost_ops.cpp.
#pragma once

#include <ATen/core/Tensor.h>

namespace align_detr {

// Sizes of one call, read off validated inputs.
struct MatchingCostSizes {
  int64_t B;     // images
  int64_t Q;     // queries per image
  int64_t C;     // classes
  int64_t sumG;  // GT boxes of all images
};

// Validated inputs of one call in the form the kernels read (the common prologue of the CPU
// and CUDA launchers): logits contiguous in their own dtype (float64 when the costs are
// computed in float64), boxes contiguous in the cost dtype, labels and offsets contiguous.
struct MatchingCostInputs {
  MatchingCostSizes sz;
  at::ScalarType cost_dtype;  // float64 when a prediction is float64, else float32
  at::Tensor logits, boxes, gt_labels, gt_boxes, gt_offsets;
};

// Error bits of the data-dependent checks (the CUDA kernels set them on the device; with
// defer_errors they travel to the host as the last element of the output).
enum MatchingCostError : int {
  kBadLogits = 1,
  kBadPredBoxes = 2,
  kBadGtBoxes = 4,
  kBadLabels = 8,
  kBadOffsets = 16,
};

// Checks ranks, sizes, dtypes and devices (no data is read, so no device sync), then converts
// and makes the inputs contiguous. Raises a c10::Error naming the offending argument.
MatchingCostInputs prepare_matching_cost(const at::Tensor& pred_logits,
                                         const at::Tensor& pred_boxes, const at::Tensor& gt_labels,
                                         const at::Tensor& gt_boxes, const at::Tensor& gt_offsets);

// Raises the error of the first bit set in `bits` (no-op for 0).
void raise_matching_cost_error(int bits, const MatchingCostSizes& sz);

at::Tensor matching_cost_cpu(const at::Tensor& pred_logits, const at::Tensor& pred_boxes,
                             const at::Tensor& gt_labels, const at::Tensor& gt_boxes,
                             const at::Tensor& gt_offsets, double class_weight, double bbox_weight,
                             double giou_weight, double alpha, double gamma, bool defer_errors);

}  // namespace align_detr
