// DETR matching cost of a whole batch: op declarations and the input validation shared by the
// CPU and CUDA launchers. The contract is in DESIGN.md ("Public op contracts") and in the schema
// comment of matching_cost_ops.cpp.
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

// Checks ranks, sizes, dtypes and devices (no data is read, so no device sync). Raises a
// c10::Error naming the offending argument.
MatchingCostSizes check_matching_cost_inputs(const at::Tensor& pred_logits,
                                             const at::Tensor& pred_boxes,
                                             const at::Tensor& gt_labels,
                                             const at::Tensor& gt_boxes,
                                             const at::Tensor& gt_offsets);

// Output dtype: float64 when pred_logits or pred_boxes is float64, else float32 (fp16 / bf16
// predictions are computed and returned in float32).
at::ScalarType matching_cost_dtype(const at::Tensor& pred_logits, const at::Tensor& pred_boxes);

at::Tensor matching_cost_cpu(const at::Tensor& pred_logits, const at::Tensor& pred_boxes,
                             const at::Tensor& gt_labels, const at::Tensor& gt_boxes,
                             const at::Tensor& gt_offsets, double class_weight,
                             double bbox_weight, double giou_weight, double alpha, double gamma);

}  // namespace align_detr
