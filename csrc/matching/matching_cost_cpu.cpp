// CPU launcher of the DETR matching cost.
//
// Work is cut into tiles of kTile consecutive queries of one image, each scored against that
// image's GT only. Inside a tile every loop runs over the tile's queries, so it is long and
// unit-stride whatever G is, and the compiler vectorises it (the per-pair math is
// matching_cost_math.h, shared with the CUDA kernel):
//   * per GT (once per call): xyxy corners and area;
//   * per tile: the predicted boxes in structure-of-arrays form, and the finiteness check of the
//     tile's logits and boxes (an OR reduction in the same pass);
//   * per tile and *distinct* class of the image: the focal class cost of each query, with
//     branch-free polynomial exp / log for float (crowded images repeat classes a lot, and the
//     transcendentals are the expensive part);
//   * per tile and GT: class cost + L1 + (-GIoU), written straight into the GT-major (G, Q)
//     output block of the image (a contiguous run of kTile queries).
// Tiles are split into tasks of equal estimated work, so images with very different GT counts
// still load the threads evenly. The loops are compiled for AVX-512, AVX2 and baseline x86-64
// and the widest one the CPU supports is picked at run time (ALIGN_DETR_CPU_ISA=baseline or
// avx2 narrows it, as for ms_deform_attn).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../cpu_isa.h"
#include "matching_cost.h"
#include "matching_cost_math.h"

namespace align_detr {
namespace {

using cpu::Isa;
using matching::Box;

constexpr int64_t kTile = 64;  // queries per tile

// Branch-free float exp / log (the Cephes polynomials, about 1 ulp on the ranges used here) and
// gamma = 2, so the class-cost loop vectorises; libm calls would keep it scalar.
struct FastFloatMathGamma2 {
  static ALIGN_DETR_ALWAYS_INLINE float exp(float x) {
    // Clamped to the normal range: exp(-87.3) ~ 1e-38 stands in for anything smaller, which
    // does not change sigmoid-based costs.
    x = matching::min_hd(matching::max_hd(x, -87.3365478515625f), 88.72283172607421875f);
    const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round(x / ln2)
    const float r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
    float y = 1.9875691500e-4f;
    y = y * r + 1.3981999507e-3f;
    y = y * r + 8.3334519073e-3f;
    y = y * r + 4.1665795894e-2f;
    y = y * r + 1.6666665459e-1f;
    y = y * r + 5.0000001201e-1f;
    y = y * r * r + r + 1.0f;
    const int32_t scale_bits = (static_cast<int32_t>(n) + 127) << 23;  // 2^n
    return y * std::bit_cast<float>(scale_bits);
  }
  // For positive normal x (here x >= 1e-8).
  static ALIGN_DETR_ALWAYS_INLINE float log(float x) {
    const int32_t bits = std::bit_cast<int32_t>(x);
    const int32_t e = (bits >> 23) - 126;  // x = m * 2^e with m in [0.5, 1)
    const float m0 = std::bit_cast<float>((bits & 0x007fffff) | 0x3f000000);
    const bool low = m0 < 0.707106781186547524f;
    const float fe = static_cast<float>(e) - (low ? 1.0f : 0.0f);
    const float m = (m0 - 1.0f) + (low ? m0 : 0.0f);  // in [sqrt(0.5) - 1, sqrt(2) - 1)
    const float z = m * m;
    float y = 7.0376836292e-2f;
    y = y * m - 1.1514610310e-1f;
    y = y * m + 1.1676998740e-1f;
    y = y * m - 1.2420140846e-1f;
    y = y * m + 1.4249322787e-1f;
    y = y * m - 1.6668057665e-1f;
    y = y * m + 2.0000714765e-1f;
    y = y * m - 2.4999993993e-1f;
    y = y * m + 3.3333331174e-1f;
    y = y * m * z;
    y += fe * -2.12194440e-4f;
    y += -0.5f * z;
    return (m + y) + fe * 0.693359375f;
  }
  static ALIGN_DETR_ALWAYS_INLINE float focal_pow(float x, float) { return x * x; }
};

// All GT of the batch in structure-of-arrays form, plus each image's distinct classes.
template <typename acc_t>
struct GtTable {
  std::vector<acc_t> cx, cy, w, h, x0, y0, x1, y1, area;  // (sumG,)
  std::vector<int32_t> uidx;    // (sumG,) position of the GT's class in its image's class list
  std::vector<int64_t> ulabel;  // distinct classes of image 0, then image 1, ...
  std::vector<int64_t> ustart;  // (B + 1,) where each image's list starts in ulabel
  int64_t max_u = 0;            // longest list
};

template <typename scalar_t, typename acc_t>
struct Args {
  const scalar_t* logits;  // (B, Q, C)
  const acc_t* boxes;      // (B, Q, 4)
  const int64_t* offsets;  // (B + 1,)
  const GtTable<acc_t>* gt;
  int64_t Q, C, tiles_per_image;
  acc_t class_weight, bbox_weight, giou_weight, alpha, gamma;
  acc_t* out;  // (Q * sumG,): image b's (G_b, Q) block at Q * offsets[b]
};

// Per-thread buffers of cost_tiles.
template <typename acc_t>
struct Scratch {
  std::vector<acc_t> buf;
  acc_t *px0, *py0, *px1, *py1, *parea, *pcx, *pcy, *pw, *ph, *logit, *cls;
  explicit Scratch(int64_t max_u) : buf((10 + max_u) * kTile) {
    acc_t* p = buf.data();
    for (acc_t** f : {&px0, &py0, &px1, &py1, &parea, &pcx, &pcy, &pw, &ph, &logit}) {
      *f = p;
      p += kTile;
    }
    cls = p;  // (max_u, kTile)
  }
};

// Costs of tiles [begin, end) (tile t = queries [q0, q0 + kTile) of image t / tiles_per_image).
// Returns false when one of the tiles' logits or boxes is not finite (its costs are then
// meaningless; the caller raises).
template <typename scalar_t, typename acc_t, typename M>
ALIGN_DETR_ALWAYS_INLINE bool cost_tiles(const Args<scalar_t, acc_t>& a, int64_t begin, int64_t end,
                                         Scratch<acc_t>& s) {
  const GtTable<acc_t>& gt = *a.gt;
  const int64_t Q = a.Q, C = a.C;
  int bad = 0;
  for (int64_t t = begin; t < end; ++t) {
    const int64_t b = t / a.tiles_per_image;
    const int64_t q0 = (t - b * a.tiles_per_image) * kTile;
    const int64_t n = std::min(kTile, Q - q0);
    const int64_t row0 = b * Q + q0;
    const scalar_t* __restrict__ lg = a.logits + row0 * C;
    const acc_t* __restrict__ pb = a.boxes + row0 * 4;
    // x - x is 0 for finite x and NaN for NaN and +-inf.
    for (int64_t i = 0; i < n * C; ++i) {
      const acc_t v = static_cast<acc_t>(lg[i]);
      bad |= (v - v) != acc_t(0);
    }
    for (int64_t i = 0; i < n * 4; ++i) bad |= (pb[i] - pb[i]) != acc_t(0);

    const int64_t g0 = a.offsets[b];
    const int64_t G = a.offsets[b + 1] - g0;
    if (G == 0) continue;

    acc_t* __restrict__ px0 = s.px0;
    acc_t* __restrict__ py0 = s.py0;
    acc_t* __restrict__ px1 = s.px1;
    acc_t* __restrict__ py1 = s.py1;
    acc_t* __restrict__ parea = s.parea;
    acc_t* __restrict__ pcx = s.pcx;
    acc_t* __restrict__ pcy = s.pcy;
    acc_t* __restrict__ pw = s.pw;
    acc_t* __restrict__ ph = s.ph;
    for (int64_t i = 0; i < n; ++i) {
      const Box<acc_t> p =
          matching::make_box(pb[4 * i], pb[4 * i + 1], pb[4 * i + 2], pb[4 * i + 3]);
      pcx[i] = p.cx;
      pcy[i] = p.cy;
      pw[i] = p.w;
      ph[i] = p.h;
      px0[i] = p.x0;
      py0[i] = p.y0;
      px1[i] = p.x1;
      py1[i] = p.y1;
      parea[i] = p.area;
    }

    const int64_t u0 = gt.ustart[b];
    const int64_t U = gt.ustart[b + 1] - u0;
    for (int64_t u = 0; u < U; ++u) {
      const int64_t label = gt.ulabel[u0 + u];
      acc_t* __restrict__ logit = s.logit;
      for (int64_t i = 0; i < n; ++i) logit[i] = static_cast<acc_t>(lg[i * C + label]);
      acc_t* __restrict__ cls = s.cls + u * kTile;
      const acc_t cw = a.class_weight, alpha = a.alpha, gamma = a.gamma;
      for (int64_t i = 0; i < n; ++i) {
        cls[i] = cw * matching::focal_class_cost<acc_t, M>(logit[i], alpha, gamma);
      }
    }

    // Image b's block is GT-major, (G, Q): row g holds GT g's cost for every query.
    const acc_t bw = a.bbox_weight, gw = a.giou_weight;
    for (int64_t g = 0; g < G; ++g) {
      const int64_t j = g0 + g;
      const acc_t gcx = gt.cx[j], gcy = gt.cy[j], gww = gt.w[j], ghh = gt.h[j];
      const acc_t gx0 = gt.x0[j], gy0 = gt.y0[j], gx1 = gt.x1[j], gy1 = gt.y1[j];
      const acc_t garea = gt.area[j];
      const acc_t* __restrict__ cls = s.cls + gt.uidx[j] * kTile;
      acc_t* __restrict__ o = a.out + j * Q + q0;
      for (int64_t i = 0; i < n; ++i) {
        const Box<acc_t> p = {pcx[i], pcy[i], pw[i],  ph[i],   px0[i],
                              py0[i], px1[i], py1[i], parea[i]};
        o[i] =
            cls[i] + matching::box_cost(p, gcx, gcy, gww, ghh, gx0, gy0, gx1, gy1, garea, bw, gw);
      }
    }
  }
  return bad == 0;
}

// ---- instruction-set variants (cpu_isa.h) --------------------------------------------------

#ifdef ALIGN_DETR_X86_MULTIVERSION
template <typename scalar_t, typename acc_t, typename M>
ALIGN_DETR_TARGET_AVX2 bool cost_tiles_avx2(const Args<scalar_t, acc_t>& a, int64_t b, int64_t e,
                                            Scratch<acc_t>& s) {
  return cost_tiles<scalar_t, acc_t, M>(a, b, e, s);
}

template <typename scalar_t, typename acc_t, typename M>
ALIGN_DETR_TARGET_AVX512 bool cost_tiles_avx512(const Args<scalar_t, acc_t>& a, int64_t b,
                                                int64_t e, Scratch<acc_t>& s) {
  return cost_tiles<scalar_t, acc_t, M>(a, b, e, s);
}
#endif

template <typename scalar_t, typename acc_t, typename M>
bool run_tiles_isa(Isa isa, const Args<scalar_t, acc_t>& a, int64_t b, int64_t e,
                   Scratch<acc_t>& s) {
#ifdef ALIGN_DETR_X86_MULTIVERSION
  if (isa == Isa::kAvx512) return cost_tiles_avx512<scalar_t, acc_t, M>(a, b, e, s);
  if (isa == Isa::kAvx2) return cost_tiles_avx2<scalar_t, acc_t, M>(a, b, e, s);
#endif
  return cost_tiles<scalar_t, acc_t, M>(a, b, e, s);
}

// Float with gamma = 2 (the DETR default) takes the vectorised exp / log; anything else libm.
template <typename scalar_t, typename acc_t>
bool run_tiles(Isa isa, const Args<scalar_t, acc_t>& a, int64_t b, int64_t e, Scratch<acc_t>& s) {
  if constexpr (std::is_same_v<acc_t, float>) {
    if (a.gamma == 2.0f) {
      return run_tiles_isa<scalar_t, acc_t, FastFloatMathGamma2>(isa, a, b, e, s);
    }
  }
  return run_tiles_isa<scalar_t, acc_t, matching::LibmMath>(isa, a, b, e, s);
}

// ---- host-side checks and tables ----------------------------------------------------------

void check_offsets(const int64_t* off, int64_t B, int64_t sumG) {
  TORCH_CHECK(off[0] == 0, "matching_cost: gt_offsets[0] must be 0, got ", off[0]);
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(off[b + 1] >= off[b],
                "matching_cost: gt_offsets must be non-decreasing, but "
                "gt_offsets[",
                b + 1, "] = ", off[b + 1], " < gt_offsets[", b, "] = ", off[b]);
  }
  TORCH_CHECK(off[B] == sumG, "matching_cost: gt_offsets[-1] = ", off[B],
              " but gt_labels has sumG = ", sumG, " entries");
}

template <typename acc_t>
GtTable<acc_t> build_gt_table(const int64_t* labels, const acc_t* boxes, const int64_t* off,
                              int64_t B, int64_t C, int64_t sumG) {
  GtTable<acc_t> t;
  for (auto* v : {&t.cx, &t.cy, &t.w, &t.h, &t.x0, &t.y0, &t.x1, &t.y1, &t.area}) {
    v->resize(sumG);
  }
  t.uidx.resize(sumG);
  t.ustart.assign(B + 1, 0);
  for (int64_t j = 0; j < sumG; ++j) {
    TORCH_CHECK(labels[j] >= 0 && labels[j] < C, "matching_cost: gt_labels[", j, "] = ", labels[j],
                " is outside [0, C) = [0, ", C, ")");
    const acc_t* bx = boxes + 4 * j;
    for (int k = 0; k < 4; ++k) {
      TORCH_CHECK(std::isfinite(bx[k]), "matching_cost: gt_boxes contains a non-finite value (",
                  bx[k], ") at gt_boxes[", j, ", ", k, "]");
    }
    const Box<acc_t> g = matching::make_box(bx[0], bx[1], bx[2], bx[3]);
    t.cx[j] = g.cx;
    t.cy[j] = g.cy;
    t.w[j] = g.w;
    t.h[j] = g.h;
    t.x0[j] = g.x0;
    t.y0[j] = g.y0;
    t.x1[j] = g.x1;
    t.y1[j] = g.y1;
    t.area[j] = g.area;
  }
  std::vector<int64_t> sorted;
  for (int64_t b = 0; b < B; ++b) {
    sorted.assign(labels + off[b], labels + off[b + 1]);
    std::sort(sorted.begin(), sorted.end());
    sorted.erase(std::unique(sorted.begin(), sorted.end()), sorted.end());
    for (int64_t j = off[b]; j < off[b + 1]; ++j) {
      t.uidx[j] = static_cast<int32_t>(std::lower_bound(sorted.begin(), sorted.end(), labels[j]) -
                                       sorted.begin());
    }
    t.ulabel.insert(t.ulabel.end(), sorted.begin(), sorted.end());
    t.ustart[b + 1] = static_cast<int64_t>(t.ulabel.size());
    t.max_u = std::max<int64_t>(t.max_u, static_cast<int64_t>(sorted.size()));
  }
  return t;
}

// Tile boundaries of tasks of about equal work. A query of image b costs about C / 16 (finiteness
// check), 4 per distinct class (vectorised transcendentals) and 2 per GT (pair cost).
template <typename acc_t>
std::vector<int64_t> split_tiles(const GtTable<acc_t>& gt, const int64_t* off, int64_t B, int64_t Q,
                                 int64_t C, int64_t tiles_per_image) {
  const int64_t n_tiles = B * tiles_per_image;
  std::vector<double> cum(n_tiles + 1, 0.0);
  for (int64_t t = 0; t < n_tiles; ++t) {
    const int64_t b = t / tiles_per_image;
    const int64_t n = std::min(kTile, Q - (t - b * tiles_per_image) * kTile);
    const double per_query =
        2.0 + C / 16.0 + 4.0 * (gt.ustart[b + 1] - gt.ustart[b]) + 2.0 * (off[b + 1] - off[b]);
    cum[t + 1] = cum[t] + per_query * n;
  }
  const double total = cum[n_tiles];
  // Below ~2e4 units (some 10 us) a thread team costs more than it saves.
  const int64_t n_tasks = total < 2e4 ? 1 : std::min<int64_t>(4 * at::get_num_threads(), n_tiles);
  std::vector<int64_t> bounds(n_tasks + 1, n_tiles);
  bounds[0] = 0;
  for (int64_t k = 1; k < n_tasks; ++k) {
    const double target = total * k / n_tasks;
    bounds[k] = std::lower_bound(cum.begin(), cum.end(), target) - cum.begin();
  }
  return bounds;
}

// Raises for the first non-finite prediction (only called once cost_rows found one).
template <typename scalar_t, typename acc_t>
void raise_non_finite(const scalar_t* logits, const acc_t* boxes, int64_t B, int64_t Q, int64_t C) {
  for (int64_t i = 0; i < B * Q * C; ++i) {
    const acc_t v = static_cast<acc_t>(logits[i]);
    TORCH_CHECK(std::isfinite(v), "matching_cost: pred_logits contains a non-finite value (", v,
                ") at pred_logits[", i / (Q * C), ", ", (i / C) % Q, ", ", i % C, "]");
  }
  for (int64_t i = 0; i < B * Q * 4; ++i) {
    TORCH_CHECK(std::isfinite(boxes[i]), "matching_cost: pred_boxes contains a non-finite value (",
                boxes[i], ") at pred_boxes[", i / (Q * 4), ", ", (i / 4) % Q, ", ", i % 4, "]");
  }
  TORCH_CHECK(false, "matching_cost: non-finite predictions");
}

}  // namespace

at::Tensor matching_cost_cpu(const at::Tensor& pred_logits, const at::Tensor& pred_boxes,
                             const at::Tensor& gt_labels, const at::Tensor& gt_boxes,
                             const at::Tensor& gt_offsets, double class_weight, double bbox_weight,
                             double giou_weight, double alpha, double gamma, bool defer_errors) {
  const MatchingCostInputs in =
      prepare_matching_cost(pred_logits, pred_boxes, gt_labels, gt_boxes, gt_offsets);
  const MatchingCostSizes& sz = in.sz;
  const at::ScalarType acc_type = in.cost_dtype;
  const at::Tensor& logits = in.logits;
  const at::Tensor& boxes = in.boxes;
  const at::Tensor& gboxes = in.gt_boxes;
  const at::Tensor& labels = in.gt_labels;
  const int64_t* off = in.gt_offsets.const_data_ptr<int64_t>();
  check_offsets(off, sz.B, sz.sumG);

  // With defer_errors the last element is the (here always clear) error word.
  const int64_t n_out = sz.Q * sz.sumG;
  at::Tensor out_buf =
      at::empty({n_out + (defer_errors ? 1 : 0)}, pred_logits.options().dtype(acc_type));
  const Isa isa = cpu::pick_isa();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, logits.scalar_type(), "matching_cost_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const GtTable<acc_t> gt =
            build_gt_table<acc_t>(labels.const_data_ptr<int64_t>(), gboxes.const_data_ptr<acc_t>(),
                                  off, sz.B, sz.C, sz.sumG);
        Args<scalar_t, acc_t> a;
        a.logits = logits.const_data_ptr<scalar_t>();
        a.boxes = boxes.const_data_ptr<acc_t>();
        a.offsets = off;
        a.gt = &gt;
        a.Q = sz.Q;
        a.C = sz.C;
        a.class_weight = static_cast<acc_t>(class_weight);
        a.bbox_weight = static_cast<acc_t>(bbox_weight);
        a.giou_weight = static_cast<acc_t>(giou_weight);
        a.alpha = static_cast<acc_t>(alpha);
        a.gamma = static_cast<acc_t>(gamma);
        a.out = out_buf.data_ptr<acc_t>();
        if (defer_errors) a.out[n_out] = acc_t(0);
        a.tiles_per_image = (sz.Q + kTile - 1) / kTile;
        const std::vector<int64_t> bounds =
            split_tiles(gt, off, sz.B, sz.Q, sz.C, a.tiles_per_image);
        const int64_t n_tasks = static_cast<int64_t>(bounds.size()) - 1;
        std::atomic<bool> all_finite{true};
        // parallel_for hands each thread a contiguous run of tasks of equal work.
        at::parallel_for(0, n_tasks, 1, [&](int64_t tb, int64_t te) {
          Scratch<acc_t> scratch(gt.max_u);
          bool ok = true;
          for (int64_t t = tb; t < te; ++t) {
            ok &= run_tiles<scalar_t, acc_t>(isa, a, bounds[t], bounds[t + 1], scratch);
          }
          if (!ok) all_finite.store(false, std::memory_order_relaxed);
        });
        if (!all_finite.load()) {
          raise_non_finite<scalar_t, acc_t>(a.logits, a.boxes, sz.B, sz.Q, sz.C);
        }
      });
  return out_buf;
}

TORCH_LIBRARY_IMPL(align_detr, CPU, m) { m.impl("matching_cost", &matching_cost_cpu); }

}  // namespace align_detr
