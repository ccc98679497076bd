// Input validation of ms_deform_attn, shared by the CPU and CUDA launchers.
#include <ATen/ATen.h>

#include "ms_deform_attn.h"

namespace align_detr {

namespace {

void check_floating(const at::Tensor& t, const char* name) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "ms_deform_attn: ", name,
              " must be a floating-point tensor, got ", t.scalar_type());
}

void check_same_device(const at::Tensor& t, const at::Tensor& value, const char* name) {
  TORCH_CHECK(t.device() == value.device(), "ms_deform_attn: ", name, " is on ", t.device(),
              " but value is on ", value.device(), "; all inputs must be on one device");
}

}  // namespace

MSDeformAttnSizes check_ms_deform_attn_inputs(const at::Tensor& value,
                                              const at::Tensor& spatial_shapes,
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

  check_floating(value, "value");
  check_floating(sampling_locations, "sampling_locations");
  check_floating(attention_weights, "attention_weights");
  TORCH_CHECK(sampling_locations.scalar_type() == value.scalar_type() &&
                  attention_weights.scalar_type() == value.scalar_type(),
              "ms_deform_attn: value, sampling_locations and attention_weights must share a "
              "dtype, got ",
              value.scalar_type(), ", ", sampling_locations.scalar_type(), ", ",
              attention_weights.scalar_type(), " (the Python wrapper promotes them)");
  TORCH_CHECK(spatial_shapes.scalar_type() == at::kLong,
              "ms_deform_attn: spatial_shapes must be int64, got ", spatial_shapes.scalar_type());
  TORCH_CHECK(level_start_index.scalar_type() == at::kLong,
              "ms_deform_attn: level_start_index must be int64, got ",
              level_start_index.scalar_type());
  check_same_device(sampling_locations, value, "sampling_locations");
  check_same_device(attention_weights, value, "attention_weights");
  check_same_device(spatial_shapes, value, "spatial_shapes");
  check_same_device(level_start_index, value, "level_start_index");

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

  // The level table is tiny; reading it on the host costs one small copy for CUDA inputs.
  const at::Tensor shapes = spatial_shapes.to(at::kCPU).contiguous();
  const at::Tensor starts = level_start_index.to(at::kCPU).contiguous();
  const int64_t* hw = shapes.const_data_ptr<int64_t>();
  const int64_t* st = starts.const_data_ptr<int64_t>();
  int64_t rows = 0;
  for (int64_t l = 0; l < sz.L; ++l) {
    const int64_t H = hw[2 * l], W = hw[2 * l + 1];
    TORCH_CHECK(H > 0 && W > 0, "ms_deform_attn: spatial_shapes[", l, "] = (", H, ", ", W,
                ") must be positive");
    TORCH_CHECK(st[l] == rows, "ms_deform_attn: level_start_index[", l, "] = ", st[l],
                " but the levels before it hold ", rows,
                " rows (it must be the exclusive cumulative sum of H * W)");
    TORCH_CHECK(H <= (int64_t(1) << 31) && W <= (int64_t(1) << 31) &&
                    H * W <= (int64_t(1) << 62) - rows,
                "ms_deform_attn: spatial_shapes[", l, "] is too large");
    rows += H * W;
  }
  TORCH_CHECK(rows == sz.S, "ms_deform_attn: value has S = ", sz.S,
              " rows but spatial_shapes describes sum(H * W) = ", rows);
  return sz;
}

void check_ms_deform_attn_grad_output(const at::Tensor& grad_output, const at::Tensor& value,
                                      const MSDeformAttnSizes& sz) {
  const std::vector<int64_t> expect = {sz.N, sz.Lq, sz.M * sz.D};
  TORCH_CHECK(grad_output.sizes() == at::IntArrayRef(expect),
              "ms_deform_attn_backward: grad_output must be (N, Lq, M * D) = ",
              at::IntArrayRef(expect), ", got ", grad_output.sizes());
  TORCH_CHECK(grad_output.scalar_type() == value.scalar_type(),
              "ms_deform_attn_backward: grad_output must have value's dtype ",
              value.scalar_type(), ", got ", grad_output.scalar_type());
  check_same_device(grad_output, value, "grad_output");
}

}  // namespace align_detr
