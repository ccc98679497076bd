// Schemas and input validation of multi-scale deformable attention (shared by the CPU and CUDA
// launchers; the Python wrapper and autograd are in align_detr/_ext.py and
// align_detr/layers/ms_deform_attn.py).
//
// ms_deform_attn_forward(value, spatial_shapes, level_start_index, sampling_locations,
//                        attention_weights) -> out
//   value              (N, S, M, D) floating; S = sum(H_l * W_l)
//   spatial_shapes     (L, 2) int64 (H_l, W_l)      } the level table: on the CPU (preferred,
//   level_start_index  (L,)  int64                  } no device sync) or on value's device
//   sampling_locations (N, Lq, M, L, P, 2) normalised (x, y), value's dtype
//   attention_weights  (N, Lq, M, L, P), value's dtype
//   -> out (N, Lq, M * D). Sampling = grid_sample(align_corners=False, padding_mode="zeros").
// ms_deform_attn_backward(..., grad_output, output_mask) -> (grad_value, grad_loc, grad_attn)
//   output_mask says which of the three gradients to compute; the others come back empty.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <limits>
#include <vector>

#include "../checks.h"
#include "ms_deform_attn.h"

TORCH_LIBRARY_FRAGMENT(align_detr, m) {
  m.def(
      "ms_deform_attn_forward(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights) -> Tensor");
  m.def(
      "ms_deform_attn_backward(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights, Tensor grad_output, "
      "bool[3] output_mask=[True, True, True]) -> (Tensor, Tensor, Tensor)");
}

namespace align_detr {

namespace {

constexpr const char* kOp = "ms_deform_attn";

MSDeformAttnSizes check_sizes(const at::Tensor& value, const at::Tensor& spatial_shapes,
                              const at::Tensor& level_start_index,
                              const at::Tensor& sampling_locations,
                              const at::Tensor& attention_weights) {
  TORCH_CHECK(value.dim() == 4, "ms_deform_attn: value must be (N, S, M, D), got shape ",
              value.sizes());
  TORCH_CHECK(spatial_shapes.dim() == 2 && spatial_shapes.size(1) == 2,
              "ms_deform_attn: spatial_shapes must be (L, 2), got shape ", spatial_shapes.sizes());
  TORCH_CHECK(level_start_index.dim() == 1,
              "ms_deform_attn: level_start_index must be (L,), got shape ",
              level_start_index.sizes());
  TORCH_CHECK(sampling_locations.dim() == 6,
              "ms_deform_attn: sampling_locations must be (N, Lq, M, L, P, 2), got shape ",
              sampling_locations.sizes());
  TORCH_CHECK(attention_weights.dim() == 5,
              "ms_deform_attn: attention_weights must be (N, Lq, M, L, P), got shape ",
              attention_weights.sizes());

  check_floating(kOp, value, "value");
  check_floating(kOp, sampling_locations, "sampling_locations");
  check_floating(kOp, attention_weights, "attention_weights");
  TORCH_CHECK(sampling_locations.scalar_type() == value.scalar_type() &&
                  attention_weights.scalar_type() == value.scalar_type(),
              "ms_deform_attn: value, sampling_locations and attention_weights must share a "
              "dtype, got ",
              value.scalar_type(), ", ", sampling_locations.scalar_type(), ", ",
              attention_weights.scalar_type(), " (the Python wrapper promotes them)");
  check_int64(kOp, spatial_shapes, "spatial_shapes");
  check_int64(kOp, level_start_index, "level_start_index");
  check_same_device(kOp, sampling_locations, "sampling_locations", value, "value");
  check_same_device(kOp, attention_weights, "attention_weights", value, "value");
  check_host_or_same_device(kOp, spatial_shapes, "spatial_shapes", value, "value");
  check_host_or_same_device(kOp, level_start_index, "level_start_index", value, "value");

  MSDeformAttnSizes sz;
  sz.N = value.size(0);
  sz.S = value.size(1);
  sz.M = value.size(2);
  sz.D = value.size(3);
  sz.Lq = sampling_locations.size(1);
  sz.L = spatial_shapes.size(0);
  sz.P = sampling_locations.size(4);

  TORCH_CHECK(sz.L >= 1, "ms_deform_attn: spatial_shapes must describe at least one level");
  TORCH_CHECK(level_start_index.size(0) == sz.L, "ms_deform_attn: level_start_index has ",
              level_start_index.size(0), " entries but spatial_shapes has ", sz.L, " levels");
  const std::vector<int64_t> expect_loc = {sz.N, sz.Lq, sz.M, sz.L, sz.P, 2};
  TORCH_CHECK(sampling_locations.sizes() == at::IntArrayRef(expect_loc),
              "ms_deform_attn: sampling_locations must be (N, Lq, M, L, P, 2) = ",
              at::IntArrayRef(expect_loc), " to match value ", value.sizes(), " and ", sz.L,
              " levels, got ", sampling_locations.sizes());
  const std::vector<int64_t> expect_attn = {sz.N, sz.Lq, sz.M, sz.L, sz.P};
  TORCH_CHECK(attention_weights.sizes() == at::IntArrayRef(expect_attn),
              "ms_deform_attn: attention_weights must be (N, Lq, M, L, P) = ",
              at::IntArrayRef(expect_attn), ", got ", attention_weights.sizes());
  return sz;
}

LevelTable read_level_table(const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                            const MSDeformAttnSizes& sz) {
  const at::Tensor shapes = host_copy(spatial_shapes);
  const at::Tensor starts = host_copy(level_start_index);
  const int64_t* hw = shapes.const_data_ptr<int64_t>();
  const int64_t* st = starts.const_data_ptr<int64_t>();
  constexpr int64_t kMaxPixels = std::numeric_limits<int32_t>::max();
  LevelTable t;
  int64_t rows = 0;
  for (int64_t l = 0; l < sz.L; ++l) {
    const int64_t H = hw[2 * l], W = hw[2 * l + 1];
    TORCH_CHECK(H > 0 && W > 0, "ms_deform_attn: spatial_shapes[", l, "] = (", H, ", ", W,
                ") must be positive");
    TORCH_CHECK(st[l] == rows, "ms_deform_attn: level_start_index[", l, "] = ", st[l],
                " but the levels before it hold ", rows,
                " rows (it must be the exclusive cumulative sum of H * W)");
    TORCH_CHECK(H <= kMaxPixels && W <= kMaxPixels && H * W <= kMaxPixels,
                "ms_deform_attn: spatial_shapes[", l, "] = (", H, ", ", W,
                ") is too large (H * W must be below 2^31)");
    t.H.push_back(H);
    t.W.push_back(W);
    t.start.push_back(rows);
    rows += H * W;
  }
  TORCH_CHECK(rows == sz.S, "ms_deform_attn: value has S = ", sz.S,
              " rows but spatial_shapes describes sum(H * W) = ", rows);
  return t;
}

}  // namespace

MSDeformAttnInputs prepare_ms_deform_attn(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                          const at::Tensor& level_start_index,
                                          const at::Tensor& sampling_locations,
                                          const at::Tensor& attention_weights,
                                          const at::Tensor* grad_output) {
  MSDeformAttnInputs in;
  in.sz =
      check_sizes(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  const MSDeformAttnSizes& sz = in.sz;
  if (grad_output != nullptr) {
    const std::vector<int64_t> expect = {sz.N, sz.Lq, sz.M * sz.D};
    TORCH_CHECK(grad_output->sizes() == at::IntArrayRef(expect),
                "ms_deform_attn_backward: grad_output must be (N, Lq, M * D) = ",
                at::IntArrayRef(expect), ", got ", grad_output->sizes());
    TORCH_CHECK(grad_output->scalar_type() == value.scalar_type(),
                "ms_deform_attn_backward: grad_output must have value's dtype ",
                value.scalar_type(), ", got ", grad_output->scalar_type());
    check_same_device("ms_deform_attn_backward", *grad_output, "grad_output", value, "value");
    in.grad_output = *grad_output;
  }
  in.levels = read_level_table(spatial_shapes, level_start_index, sz);
  in.value = value;
  in.loc = sampling_locations;
  in.attn = attention_weights;
  make_contiguous(in.value, in.loc, in.attn);
  if (grad_output != nullptr) make_contiguous(in.grad_output);
  return in;
}

}  // namespace align_detr
