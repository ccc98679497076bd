// Per-pair math of the DETR matching cost, written once and used by both the CPU launcher
// (matching_cost_cpu.cpp) and the CUDA kernel (matching_cost_cuda.cu), so the CPU tests check
// exactly the arithmetic the GPU runs.
//
//   cost = class_weight * focal(p) + bbox_weight * L1(cxcywh) - giou_weight * GIoU(xyxy)
//   focal(p) = alpha (1-p)^gamma (-log(p + 1e-8)) - (1-alpha) p^gamma (-log(1-p + 1e-8))
//   p = sigmoid(logit of the GT's class)
//
// Departures from the usual PyTorch formulation, all of which only matter at its failure points:
//   * 1 - p is computed as sigmoid(-logit), not by subtraction, so it keeps its precision when p
//     is close to 1 (the float32 subtraction loses all of it for logits above ~16).
//   * GIoU divides by max(union, kGiouEps) and max(enclosure, kGiouEps): two zero-area boxes
//     (zero width or height) give a finite GIoU instead of 0/0. kGiouEps = 1e-12 in normalised
//     units, far below any real box area, so ordinary boxes are unaffected.
//   * Negative widths or heights count as 0 in the GIoU term (the reference asserts instead);
//     the L1 term uses the raw values.
#pragma once

#include <cmath>
#include <cstdint>

#include "../common.h"

namespace align_detr {
namespace matching {

// Written as comparisons (not fmin/fmax) so the compiler turns them into SIMD min/max.
template <typename T>
ALIGN_DETR_HD T min_hd(T a, T b) {
  return a < b ? a : b;
}
template <typename T>
ALIGN_DETR_HD T max_hd(T a, T b) {
  return a > b ? a : b;
}
template <typename T>
ALIGN_DETR_HD T abs_hd(T a) {
  return a < T(0) ? -a : a;
}

ALIGN_DETR_HD float exp_hd(float x) { return ::expf(x); }
ALIGN_DETR_HD double exp_hd(double x) { return ::exp(x); }
ALIGN_DETR_HD float log_hd(float x) { return ::logf(x); }
ALIGN_DETR_HD double log_hd(double x) { return ::log(x); }
ALIGN_DETR_HD float pow_hd(float x, float y) { return ::powf(x, y); }
ALIGN_DETR_HD double pow_hd(double x, double y) { return ::pow(x, y); }

// The transcendentals of the class cost, as a policy so the formula below exists once: the CUDA
// kernel and the CPU double path use the C library's; the CPU float path substitutes
// branch-free polynomial versions that the compiler vectorises (matching_cost_cpu.cpp).
struct LibmMath {
  template <typename T>
  static ALIGN_DETR_HD T exp(T x) {
    return exp_hd(x);
  }
  template <typename T>
  static ALIGN_DETR_HD T log(T x) {
    return log_hd(x);
  }
  // x^gamma; gamma = 2 (every DETR recipe) avoids pow().
  template <typename T>
  static ALIGN_DETR_HD T focal_pow(T x, T gamma) {
    return gamma == T(2) ? x * x : pow_hd(x, gamma);
  }
};

// Focal classification cost of one (query, GT) pair from the query's logit of the GT's class.
// The logit must be finite (the launchers check it).
template <typename T, typename M = LibmMath>
ALIGN_DETR_HD T focal_class_cost(T logit, T alpha, T gamma) {
  const T eps = T(1e-8);
  const T t = M::exp(-abs_hd(logit));  // in (0, 1]; no overflow for any finite logit
  const T inv = T(1) / (T(1) + t);
  const T p = logit >= T(0) ? inv : t * inv;      // sigmoid(logit)
  const T not_p = logit >= T(0) ? t * inv : inv;  // 1 - p = sigmoid(-logit), no cancellation
  const T pos = alpha * M::focal_pow(not_p, gamma) * (-M::log(p + eps));
  const T neg = (T(1) - alpha) * M::focal_pow(p, gamma) * (-M::log(not_p + eps));
  return pos - neg;
}

// A box in both forms; corners and area use the sizes clamped at 0 (see the file comment).
template <typename T>
struct Box {
  T cx, cy, w, h;    // as given (normalised cxcywh), used by the L1 term
  T x0, y0, x1, y1;  // xyxy corners
  T area;
};

template <typename T>
ALIGN_DETR_HD Box<T> make_box(T cx, T cy, T w, T h) {
  Box<T> b;
  b.cx = cx;
  b.cy = cy;
  b.w = w;
  b.h = h;
  const T hw = max_hd(w, T(0)) * T(0.5);
  const T hh = max_hd(h, T(0)) * T(0.5);
  b.x0 = cx - hw;
  b.x1 = cx + hw;
  b.y0 = cy - hh;
  b.y1 = cy + hh;
  b.area = (b.x1 - b.x0) * (b.y1 - b.y0);
  return b;
}

// Guard of the two GIoU divisions (see the file comment).
template <typename T>
ALIGN_DETR_HD T giou_eps() {
  return T(1e-12);
}

// Generalised IoU of a prediction and a GT given by its fields (the CPU launcher keeps the GT
// fields in separate arrays so this loop vectorises). Branch-free.
template <typename T>
ALIGN_DETR_HD T generalized_iou(const Box<T>& p, T gx0, T gy0, T gx1, T gy1, T garea) {
  const T iw = max_hd(min_hd(p.x1, gx1) - max_hd(p.x0, gx0), T(0));
  const T ih = max_hd(min_hd(p.y1, gy1) - max_hd(p.y0, gy0), T(0));
  const T inter = iw * ih;
  const T uni = p.area + garea - inter;
  const T ew = max_hd(p.x1, gx1) - min_hd(p.x0, gx0);
  const T eh = max_hd(p.y1, gy1) - min_hd(p.y0, gy0);
  const T encl = ew * eh;
  return inter / max_hd(uni, giou_eps<T>()) - (encl - uni) / max_hd(encl, giou_eps<T>());
}

// bbox_weight * L1 + giou_weight * (-GIoU) of one pair.
template <typename T>
ALIGN_DETR_HD T box_cost(const Box<T>& p, T gcx, T gcy, T gw, T gh, T gx0, T gy0, T gx1, T gy1,
                         T garea, T bbox_weight, T giou_weight) {
  const T l1 = abs_hd(p.cx - gcx) + abs_hd(p.cy - gcy) + abs_hd(p.w - gw) + abs_hd(p.h - gh);
  return bbox_weight * l1 - giou_weight * generalized_iou(p, gx0, gy0, gx1, gy1, garea);
}

// The same, with the GT as a Box (the CUDA kernel's form).
template <typename T>
ALIGN_DETR_HD T box_cost(const Box<T>& p, const Box<T>& g, T bbox_weight, T giou_weight) {
  return box_cost(p, g.cx, g.cy, g.w, g.h, g.x0, g.y0, g.x1, g.y1, g.area, bbox_weight,
                  giou_weight);
}

}  // namespace matching
}  // namespace align_detr
