// Minimum-cost one-to-one / many-to-one assignment of the images of a batch (CPU).
//
// Each image's block of the matching cost is solved as one rectangular linear assignment
// in which every GT gets exactly k_eff = max(1, min(k, Q / G)) distinct queries: the GT columns
// are replicated k_eff times (virtually: copy c of GT g is search row c * G + g and reads GT
// g's row of the GT-major block, no copy is made) and no query is used twice. When Q < G the
// problem is solved the other way round and min(Q, G) pairs come out.
//
// The solver is the shortest augmenting path algorithm of Jonker-Volgenant as described by
// Crouse ("On implementing 2D rectangular assignment algorithms", IEEE TAES 2016), the one
// SciPy's linear_sum_assignment implements: one Dijkstra search over the columns per row, with
// dual potentials kept in float64. Unlike SciPy's scalar loop over a list of remaining columns,
// each Dijkstra step here is one branch-free pass over all columns (scanned columns are masked
// by a +inf penalty) that the compiler vectorises, with per-chunk minima so that finding the
// arg-min costs one short scan. Ties between equally short paths may be broken differently
// from SciPy; the total cost is the same (the tests check it against SciPy).
//
// Images are solved in parallel (at::parallel_for over images).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../cpu_isa.h"
#include "lsap.h"

// The schema is in assign_batch_ops.cpp.
namespace align_detr {
namespace {

using matching::Lsap;

int64_t effective_k(int64_t k, int64_t Q, int64_t G) {
  return G <= 0 ? std::max<int64_t>(1, k) : std::max<int64_t>(1, std::min(k, Q / G));
}

int64_t num_pairs(int64_t k, int64_t Q, int64_t G) {
  if (G == 0 || Q == 0) return 0;
  return Q < G ? Q : effective_k(k, Q, G) * G;
}

// Search row i of the problem with the GT as rows: copy i / G of GT i % G, whose costs are row
// i % G of the GT-major block.
template <typename T>
struct GtRows {
  const T* base;
  int64_t G, Q;
  ALIGN_DETR_ALWAYS_INLINE const T* operator()(int64_t i) const { return base + (i % G) * Q; }
};

// Search row i of the problem with the queries as rows (Q < G), from a query-major copy.
template <typename T>
struct QueryRows {
  const T* base;
  int64_t G;
  ALIGN_DETR_ALWAYS_INLINE const T* operator()(int64_t i) const { return base + i * G; }
};

// Solves one image's GT-major (G, Q) block; writes num_pairs(k, Q, G) pairs grouped by GT.
template <typename T>
ALIGN_DETR_ALWAYS_INLINE void solve_image(const T* block, int64_t Q, int64_t G, int64_t k, Lsap& w,
                                          std::vector<T>& ct, int64_t* rows, int64_t* cols) {
  if (G == 0 || Q == 0) return;
  if (Q >= G) {
    const int64_t ke = effective_k(k, Q, G);
    w.solve<T>(ke * G, Q, GtRows<T>{block, G, Q});
    for (int64_t g = 0; g < G; ++g) {
      int64_t* r = rows + g * ke;
      for (int64_t c = 0; c < ke; ++c) {
        r[c] = w.col4row[c * G + g];
        cols[g * ke + c] = g;
      }
      std::sort(r, r + ke);
    }
  } else {
    // More GT than queries: every query gets one GT; the queries are the search rows.
    ct.resize(Q * G);
    for (int64_t g = 0; g < G; ++g) {
      for (int64_t q = 0; q < Q; ++q) ct[q * G + g] = block[g * Q + q];
    }
    w.solve<T>(Q, G, QueryRows<T>{ct.data(), G});
    std::vector<int64_t> start(G + 1, 0);
    for (int64_t q = 0; q < Q; ++q) ++start[w.col4row[q] + 1];
    for (int64_t g = 0; g < G; ++g) start[g + 1] += start[g];
    for (int64_t q = 0; q < Q; ++q) {  // counting sort by GT, stable in q
      const int64_t at = start[w.col4row[q]]++;
      rows[at] = q;
      cols[at] = w.col4row[q];
    }
  }
}

#ifdef ALIGN_DETR_X86_MULTIVERSION
template <typename T>
ALIGN_DETR_TARGET_AVX2 void solve_image_avx2(const T* block, int64_t Q, int64_t G, int64_t k,
                                             Lsap& w, std::vector<T>& ct, int64_t* rows,
                                             int64_t* cols) {
  solve_image<T>(block, Q, G, k, w, ct, rows, cols);
}

template <typename T>
ALIGN_DETR_TARGET_AVX512 void solve_image_avx512(const T* block, int64_t Q, int64_t G, int64_t k,
                                                 Lsap& w, std::vector<T>& ct, int64_t* rows,
                                                 int64_t* cols) {
  solve_image<T>(block, Q, G, k, w, ct, rows, cols);
}
#endif

template <typename T>
void run_image(cpu::Isa isa, const T* block, int64_t Q, int64_t G, int64_t k, Lsap& w,
               std::vector<T>& ct, int64_t* rows, int64_t* cols) {
#ifdef ALIGN_DETR_X86_MULTIVERSION
  if (isa == cpu::Isa::kAvx512) {
    return solve_image_avx512<T>(block, Q, G, k, w, ct, rows, cols);
  }
  if (isa == cpu::Isa::kAvx2) return solve_image_avx2<T>(block, Q, G, k, w, ct, rows, cols);
#endif
  solve_image<T>(block, Q, G, k, w, ct, rows, cols);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> assign_batch_cpu(const at::Tensor& cost,
                                                                const at::Tensor& offsets,
                                                                int64_t num_queries, int64_t k) {
  TORCH_CHECK(cost.device().is_cpu() && offsets.device().is_cpu(),
              "assign_batch: cost and offsets must be CPU tensors");
  TORCH_CHECK(cost.dim() == 1, "assign_batch: cost must be flat (Q * sumG,), got shape ",
              cost.sizes());
  TORCH_CHECK(cost.scalar_type() == at::kFloat || cost.scalar_type() == at::kDouble,
              "assign_batch: cost must be float32 or float64, got ", cost.scalar_type());
  TORCH_CHECK(offsets.dim() == 1 && offsets.size(0) >= 1 && offsets.scalar_type() == at::kLong,
              "assign_batch: offsets must be int64 (B + 1,), got ", offsets.scalar_type(), " ",
              offsets.sizes());
  TORCH_CHECK(num_queries >= 0, "assign_batch: num_queries must be >= 0, got ", num_queries);
  TORCH_CHECK(k >= 1, "assign_batch: k must be >= 1, got ", k);
  const at::Tensor off_t = offsets.contiguous();
  const int64_t* off = off_t.const_data_ptr<int64_t>();
  const int64_t B = off_t.size(0) - 1;
  TORCH_CHECK(off[0] == 0, "assign_batch: offsets[0] must be 0, got ", off[0]);
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(off[b + 1] >= off[b], "assign_batch: offsets must be non-decreasing");
  }
  TORCH_CHECK(cost.size(0) == num_queries * off[B], "assign_batch: cost has ", cost.size(0),
              " entries but num_queries * offsets[-1] = ", num_queries * off[B]);
  const at::Tensor c = cost.contiguous();
  AT_DISPATCH_FLOATING_TYPES(c.scalar_type(), "assign_batch_check", [&] {
    const scalar_t* x = c.const_data_ptr<scalar_t>();
    int bad = 0;
    for (int64_t i = 0; i < c.numel(); ++i) bad |= (x[i] - x[i]) != scalar_t(0);  // NaN, inf
    TORCH_CHECK(bad == 0, "assign_batch: cost contains NaN or inf");
  });

  at::Tensor pair_off = at::empty({B + 1}, offsets.options());
  int64_t* po = pair_off.data_ptr<int64_t>();
  po[0] = 0;
  for (int64_t b = 0; b < B; ++b) {
    po[b + 1] = po[b] + num_pairs(k, num_queries, off[b + 1] - off[b]);
  }
  at::Tensor rows = at::empty({po[B]}, offsets.options());
  at::Tensor cols = at::empty({po[B]}, offsets.options());
  int64_t* rp = rows.data_ptr<int64_t>();
  int64_t* cp = cols.data_ptr<int64_t>();
  const cpu::Isa isa = cpu::pick_isa();
  AT_DISPATCH_FLOATING_TYPES(c.scalar_type(), "assign_batch_cpu", [&] {
    const scalar_t* data = c.const_data_ptr<scalar_t>();
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      Lsap w;
      std::vector<scalar_t> ct;
      for (int64_t b = b0; b < b1; ++b) {
        run_image<scalar_t>(isa, data + num_queries * off[b], num_queries, off[b + 1] - off[b], k,
                            w, ct, rp + po[b], cp + po[b]);
      }
    });
  });
  return {rows, cols, pair_off};
}

}  // namespace

TORCH_LIBRARY_IMPL(align_detr, CPU, m) { m.impl("assign_batch", &assign_batch_cpu); }

}  // namespace align_detr
