// Schema of align_detr::assign_batch (CPU kernel in assign_cpu.cpp; the Python wrapper is
// align_detr/matching/assignment.py).
//
// assign_batch(cost, offsets, num_queries, k) -> (rows, cols, pair_offsets)
//   cost (Q * sumG,) float32 / float64: image b's GT-major (G_b, Q) block at Q * offsets[b]
//   (the layout of matching_cost's output); offsets (B + 1,) int64, exclusive cumsum of G_b.
//   -> rows, cols (P,) int64: image b's pairs at [pair_offsets[b], pair_offsets[b + 1]), grouped
//   by GT index, queries increasing within a GT; pair_offsets (B + 1,) int64. Host tensors only.
//   Every GT of image b gets k_eff = max(1, min(k, Q / G_b)) distinct queries (min(Q, G_b)
//   pairs when Q < G_b), at minimum total cost.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(align_detr, m) {
  m.def(
      "assign_batch(Tensor cost, Tensor offsets, int num_queries, int k) "
      "-> (Tensor, Tensor, Tensor)");
}
