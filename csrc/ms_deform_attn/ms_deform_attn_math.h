// Per-element math of multi-scale deformable attention, written once and used by both the CPU
// launcher (ms_deform_attn_cpu.cpp) and the CUDA kernels (ms_deform_attn_cuda.cu), so the CPU
// tests check exactly the arithmetic the GPU runs.
//
// Sampling convention = grid_sample(align_corners=False, padding_mode="zeros"):
//   pixel x = loc_x * W - 0.5, pixel y = loc_y * H - 0.5; a sample with x <= -1, y <= -1, x >= W
//   or y >= H (or NaN) contributes nothing at all; a corner outside the map reads as zero.
#pragma once

#include <cstdint>

#include "../common.h"

namespace align_detr {
namespace msda {

// One bilinear sample. Corner order used everywhere: 0 = (y0, x0), 1 = (y0, x1), 2 = (y1, x0),
// 3 = (y1, x1). Pixels of a level are indexed h * W + w in 32 bits (H * W < 2^31 is checked on
// the host); the caller adds the level's 64-bit base.
template <typename acc_t>
struct Bilinear {
  int32_t pix0;     // y0 * W + x0, the pixel of corner 0 (negative when y0 or x0 is -1)
  uint32_t mask;    // bit c set when corner c lies inside the map (0xF: all four inside)
  acc_t lx, ly;     // fractional offsets from (x0, y0); hx = 1 - lx, hy = 1 - ly
  acc_t weight[4];  // bilinear weight of each corner (0 for corners outside the map)
};

// Pixel of corner c (meaningful only when bit c of the mask is set).
ALIGN_DETR_HD int32_t corner_pixel(int32_t pix0, int c, int32_t W) {
  return pix0 + (c & 1) + (c >> 1) * W;
}

// Bilinear weights of the four corners from the fractional offsets; corners outside the map
// (mask bit clear) get 0.
template <typename acc_t>
ALIGN_DETR_HD void corner_weights(acc_t lx, acc_t ly, uint32_t mask, acc_t (&w)[4]) {
  const acc_t hx = acc_t(1) - lx;
  const acc_t hy = acc_t(1) - ly;
  const acc_t wgt[4] = {hy * hx, hy * lx, ly * hx, ly * lx};
  // 0/1 factors rather than branches: the CPU loop stays branch-light.
  for (int c = 0; c < 4; ++c) w[c] = wgt[c] * static_cast<acc_t>((mask >> c) & 1u);
}

// Sets up the bilinear sample at normalised (loc_x, loc_y) on an H x W map.
// Returns false when the sample lies wholly outside the map (or is NaN): it then contributes no
// output and receives no gradient, matching the reference CUDA kernel's strict test.
template <typename acc_t>
ALIGN_DETR_HD bool bilinear_setup(acc_t loc_x, acc_t loc_y, int32_t H, int32_t W,
                                  Bilinear<acc_t>& s) {
  const acc_t x = loc_x * static_cast<acc_t>(W) - acc_t(0.5);
  const acc_t y = loc_y * static_cast<acc_t>(H) - acc_t(0.5);
  // Written so that NaN fails the test; the bounds also keep the casts below in range.
  if (!(x > acc_t(-1) && y > acc_t(-1) && x < static_cast<acc_t>(W) && y < static_cast<acc_t>(H))) {
    return false;
  }
  const acc_t xf = floor_hd(x);
  const acc_t yf = floor_hd(y);
  const int32_t x0 = static_cast<int32_t>(xf);  // in [-1, W - 1]
  const int32_t y0 = static_cast<int32_t>(yf);  // in [-1, H - 1]
  s.lx = x - xf;
  s.ly = y - yf;
  const bool in_x0 = x0 >= 0, in_x1 = x0 + 1 <= W - 1;
  const bool in_y0 = y0 >= 0, in_y1 = y0 + 1 <= H - 1;
  s.mask = static_cast<uint32_t>(in_y0 && in_x0) | static_cast<uint32_t>(in_y0 && in_x1) << 1 |
           static_cast<uint32_t>(in_y1 && in_x0) << 2 | static_cast<uint32_t>(in_y1 && in_x1) << 3;
  s.pix0 = y0 * W + x0;  // >= -W - 1 and < H * W: no overflow
  corner_weights(s.lx, s.ly, s.mask, s.weight);
  return true;
}

// Weighted sum of one channel's four corner values (0 for corners outside).
template <typename acc_t>
ALIGN_DETR_HD acc_t interpolate(const acc_t (&w)[4], acc_t v0, acc_t v1, acc_t v2, acc_t v3) {
  return w[0] * v0 + w[1] * v1 + w[2] * v2 + w[3] * v3;
}

// Interpolated value of one channel from its four corner values.
template <typename acc_t>
ALIGN_DETR_HD acc_t bilinear_value(const Bilinear<acc_t>& s, acc_t v0, acc_t v1, acc_t v2,
                                   acc_t v3) {
  return interpolate(s.weight, v0, v1, v2, v3);
}

// Folds the attention weight of a sample into its corner weights (done once per sample, so the
// per-channel loop is four multiply-adds).
template <typename acc_t>
ALIGN_DETR_HD Bilinear<acc_t> scale_weights(Bilinear<acc_t> s, acc_t attention) {
  for (int c = 0; c < 4; ++c) s.weight[c] *= attention;
  return s;
}

// Backward of one channel of one sample. With g = d(loss)/d(out) for this channel:
//   grad_attn += g * value, grad_x += g * d(value)/dx, grad_y += g * d(value)/dy
// (x, y in pixels; location_gradient scales them). The value gradient of corner c is
// attention * weight[c] * g and is scattered by the caller.
template <typename acc_t>
ALIGN_DETR_HD void bilinear_backward(const Bilinear<acc_t>& s, acc_t v0, acc_t v1, acc_t v2,
                                     acc_t v3, acc_t g, acc_t& grad_attn, acc_t& grad_x,
                                     acc_t& grad_y) {
  const acc_t hx = acc_t(1) - s.lx;
  const acc_t hy = acc_t(1) - s.ly;
  grad_attn += g * bilinear_value(s, v0, v1, v2, v3);
  grad_x += g * (hy * (v1 - v0) + s.ly * (v3 - v2));
  grad_y += g * (hx * (v2 - v0) + s.lx * (v3 - v1));
}

// Gradient of a normalised coordinate from the summed pixel-space gradient grad_pix of one
// sample: d(pixel)/d(loc) = size (W for x, H for y), times the sample's attention weight.
// Computed in acc_t (fp32 for fp16 / bf16 inputs); only the final rounding to the input dtype
// can overflow, exactly where the true gradient exceeds that dtype's range.
template <typename acc_t>
ALIGN_DETR_HD acc_t location_gradient(acc_t grad_pix, acc_t attention, int32_t size) {
  return grad_pix * attention * static_cast<acc_t>(size);
}

}  // namespace msda
}  // namespace align_detr
