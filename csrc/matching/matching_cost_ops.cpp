// Schema and input validation of align_detr::matching_cost (shared by the CPU and CUDA
// launchers; the Python wrapper is align_detr/matching/cost.py).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "matching_cost.h"

// matching_cost(pred_logits, pred_boxes, gt_labels, gt_boxes, gt_offsets, weights...) -> flat
//   pred_logits (B, Q, C) floating, pred_boxes (B, Q, 4) floating, normalised cxcywh
//   gt_labels (sumG,) int64 in [0, C), gt_boxes (sumG, 4) floating cxcywh: all images' GT,
//   concatenated; gt_offsets (B + 1,) int64, the exclusive cumsum of the per-image GT counts.
//   -> (Q * sumG,) holding image b's cost block at offset Q * gt_offsets[b], GT-major: (G_b, Q)
//   row-major, i.e. element g * Q + q of the block is the cost of query q for GT g. (GT-major
//   because the assignment solver scans one GT's costs over all queries.)
// Each image is scored against its own GT only (no [B*Q, sumG] cross-image matrix). Non-finite
// predictions or GT boxes, labels out of range and inconsistent offsets raise. No autograd.
TORCH_LIBRARY_FRAGMENT(align_detr, m) {
  m.def(
      "matching_cost(Tensor pred_logits, Tensor pred_boxes, Tensor gt_labels, Tensor gt_boxes, "
      "Tensor gt_offsets, float class_weight, float bbox_weight, float giou_weight, float alpha, "
      "float gamma) -> Tensor");
}

namespace align_detr {

namespace {

void check_floating(const at::Tensor& t, const char* name) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "matching_cost: ", name,
              " must be a floating-point tensor, got ", t.scalar_type());
}

void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* name) {
  TORCH_CHECK(t.device() == ref.device(), "matching_cost: ", name, " is on ", t.device(),
              " but pred_logits is on ", ref.device(), "; all inputs must be on one device");
}

}  // namespace

MatchingCostSizes check_matching_cost_inputs(const at::Tensor& pred_logits,
                                             const at::Tensor& pred_boxes,
                                             const at::Tensor& gt_labels,
                                             const at::Tensor& gt_boxes,
                                             const at::Tensor& gt_offsets) {
  TORCH_CHECK(pred_logits.dim() == 3, "matching_cost: pred_logits must be (B, Q, C), got shape ",
              pred_logits.sizes());
  TORCH_CHECK(pred_boxes.dim() == 3 && pred_boxes.size(2) == 4,
              "matching_cost: pred_boxes must be (B, Q, 4), got shape ", pred_boxes.sizes());
  TORCH_CHECK(pred_boxes.size(0) == pred_logits.size(0) &&
                  pred_boxes.size(1) == pred_logits.size(1),
              "matching_cost: pred_boxes ", pred_boxes.sizes(),
              " does not match pred_logits (B, Q) = ", pred_logits.sizes().slice(0, 2));
  TORCH_CHECK(gt_labels.dim() == 1, "matching_cost: gt_labels must be (sumG,), got shape ",
              gt_labels.sizes());
  TORCH_CHECK(gt_boxes.dim() == 2 && gt_boxes.size(1) == 4,
              "matching_cost: gt_boxes must be (sumG, 4), got shape ", gt_boxes.sizes());
  TORCH_CHECK(gt_boxes.size(0) == gt_labels.size(0), "matching_cost: gt_boxes has ",
              gt_boxes.size(0), " rows but gt_labels has ", gt_labels.size(0), " entries");
  TORCH_CHECK(gt_offsets.dim() == 1 && gt_offsets.size(0) == pred_logits.size(0) + 1,
              "matching_cost: gt_offsets must be (B + 1,) = (", pred_logits.size(0) + 1,
              ",), got shape ", gt_offsets.sizes());

  check_floating(pred_logits, "pred_logits");
  check_floating(pred_boxes, "pred_boxes");
  check_floating(gt_boxes, "gt_boxes");
  TORCH_CHECK(gt_labels.scalar_type() == at::kLong, "matching_cost: gt_labels must be int64, got ",
              gt_labels.scalar_type());
  TORCH_CHECK(gt_offsets.scalar_type() == at::kLong,
              "matching_cost: gt_offsets must be int64, got ", gt_offsets.scalar_type());
  check_same_device(pred_boxes, pred_logits, "pred_boxes");
  check_same_device(gt_labels, pred_logits, "gt_labels");
  check_same_device(gt_boxes, pred_logits, "gt_boxes");
  check_same_device(gt_offsets, pred_logits, "gt_offsets");

  MatchingCostSizes sz;
  sz.B = pred_logits.size(0);
  sz.Q = pred_logits.size(1);
  sz.C = pred_logits.size(2);
  sz.sumG = gt_labels.size(0);
  TORCH_CHECK(sz.sumG == 0 || sz.C > 0,
              "matching_cost: pred_logits has no classes (C = 0) but there are GT boxes");
  return sz;
}

at::ScalarType matching_cost_dtype(const at::Tensor& pred_logits, const at::Tensor& pred_boxes) {
  return pred_logits.scalar_type() == at::kDouble || pred_boxes.scalar_type() == at::kDouble
             ? at::kDouble
             : at::kFloat;
}

}  // namespace align_detr
