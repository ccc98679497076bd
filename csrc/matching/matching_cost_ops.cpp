// Schema and input validation of align_detr::matching_cost (shared by the CPU and CUDA
// launchers; the Python wrapper is align_detr/matching/cost.py).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../checks.h"
#include "matching_cost.h"

// matching_cost(pred_logits, pred_boxes, gt_labels, gt_boxes, gt_offsets, weights...,
//               defer_errors=False) -> flat
//   pred_logits (B, Q, C) floating, pred_boxes (B, Q, 4) floating, normalised cxcywh
//   gt_labels (sumG,) int64 in [0, C), gt_boxes (sumG, 4) floating cxcywh: all images' GT,
//   concatenated; gt_offsets (B + 1,) int64, the exclusive cumsum of the per-image GT counts.
//   -> (Q * sumG,) holding image b's cost block at offset Q * gt_offsets[b], GT-major: (G_b, Q)
//   row-major, i.e. element g * Q + q of the block is the cost of query q for GT g. (GT-major
//   because the assignment solver scans one GT's costs over all queries.)
// Each image is scored against its own GT only (no [B*Q, sumG] cross-image matrix). Non-finite
// predictions or GT boxes, labels out of range and inconsistent offsets raise. No autograd.
// defer_errors=True appends one element: on CUDA the op then raises nothing for bad data and
// never waits for the device; the element holds the MatchingCostError bits (0: no error), so
// the caller learns of them from the same device-to-host copy as the costs and raises there.
// On the CPU the op raises as usual and the element is 0.
TORCH_LIBRARY_FRAGMENT(align_detr, m) {
  m.def(
      "matching_cost(Tensor pred_logits, Tensor pred_boxes, Tensor gt_labels, Tensor gt_boxes, "
      "Tensor gt_offsets, float class_weight, float bbox_weight, float giou_weight, float alpha, "
      "float gamma, bool defer_errors=False) -> Tensor");
}

namespace align_detr {

namespace {

constexpr const char* kOp = "matching_cost";

MatchingCostSizes check_sizes(const at::Tensor& pred_logits, const at::Tensor& pred_boxes,
                              const at::Tensor& gt_labels, const at::Tensor& gt_boxes,
                              const at::Tensor& gt_offsets) {
  TORCH_CHECK(pred_logits.dim() == 3, "matching_cost: pred_logits must be (B, Q, C), got shape ",
              pred_logits.sizes());
  TORCH_CHECK(pred_boxes.dim() == 3 && pred_boxes.size(2) == 4,
              "matching_cost: pred_boxes must be (B, Q, 4), got shape ", pred_boxes.sizes());
  TORCH_CHECK(
      pred_boxes.size(0) == pred_logits.size(0) && pred_boxes.size(1) == pred_logits.size(1),
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

  check_floating(kOp, pred_logits, "pred_logits");
  check_floating(kOp, pred_boxes, "pred_boxes");
  check_floating(kOp, gt_boxes, "gt_boxes");
  check_int64(kOp, gt_labels, "gt_labels");
  check_int64(kOp, gt_offsets, "gt_offsets");
  check_same_device(kOp, pred_boxes, "pred_boxes", pred_logits, "pred_logits");
  check_same_device(kOp, gt_labels, "gt_labels", pred_logits, "pred_logits");
  check_same_device(kOp, gt_boxes, "gt_boxes", pred_logits, "pred_logits");
  check_same_device(kOp, gt_offsets, "gt_offsets", pred_logits, "pred_logits");

  MatchingCostSizes sz;
  sz.B = pred_logits.size(0);
  sz.Q = pred_logits.size(1);
  sz.C = pred_logits.size(2);
  sz.sumG = gt_labels.size(0);
  TORCH_CHECK(sz.sumG == 0 || sz.C > 0,
              "matching_cost: pred_logits has no classes (C = 0) but there are GT boxes");
  return sz;
}

}  // namespace

MatchingCostInputs prepare_matching_cost(const at::Tensor& pred_logits,
                                         const at::Tensor& pred_boxes, const at::Tensor& gt_labels,
                                         const at::Tensor& gt_boxes, const at::Tensor& gt_offsets) {
  MatchingCostInputs in;
  in.sz = check_sizes(pred_logits, pred_boxes, gt_labels, gt_boxes, gt_offsets);
  in.cost_dtype =
      pred_logits.scalar_type() == at::kDouble || pred_boxes.scalar_type() == at::kDouble
          ? at::kDouble
          : at::kFloat;
  // Logits are read in their own dtype (fp16 / bf16 upcast per element) unless the costs are
  // computed in float64; boxes are few and converted up front.
  in.logits = in.cost_dtype == at::kDouble ? pred_logits.to(at::kDouble) : pred_logits;
  in.boxes = pred_boxes.to(in.cost_dtype);
  in.gt_boxes = gt_boxes.to(in.cost_dtype);
  in.gt_labels = gt_labels;
  in.gt_offsets = gt_offsets;
  make_contiguous(in.logits, in.boxes, in.gt_boxes, in.gt_labels, in.gt_offsets);
  return in;
}

void raise_matching_cost_error(int bits, const MatchingCostSizes& sz) {
  TORCH_CHECK(!(bits & kBadLogits),
              "matching_cost: pred_logits contains non-finite values (NaN or inf)");
  TORCH_CHECK(!(bits & kBadPredBoxes),
              "matching_cost: pred_boxes contains non-finite values (NaN or inf)");
  TORCH_CHECK(!(bits & kBadGtBoxes),
              "matching_cost: gt_boxes contains non-finite values (NaN or inf)");
  TORCH_CHECK(!(bits & kBadLabels), "matching_cost: gt_labels has values outside [0, C) = [0, ",
              sz.C, ")");
  TORCH_CHECK(
      !(bits & kBadOffsets),
      "matching_cost: gt_offsets must start at 0, be non-decreasing and end at sumG = ", sz.sumG);
}

}  // namespace align_detr
