// Dense rectangular linear assignment (shortest augmenting path, Jonker-Volgenant / Crouse), the
// solver of assign_cpu.cpp; see there for the algorithm notes.
#pragma once

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "../cpu_isa.h"

namespace align_detr {
namespace matching {

constexpr int64_t kChunk = 64;  // columns per chunk of the arg-min search
constexpr double kInf = std::numeric_limits<double>::infinity();

// Workspace of one solve, reused across the images a thread handles.
struct Lsap {
  std::vector<double> u, v, spc, pen, chunk_min;
  std::vector<int64_t> path, row4col, col4row, sr, sc;
  int64_t steps = 0;  // Dijkstra steps of the last solve (for profiling)

  // Solves rows [0, n) against columns [0, m), n <= m, cost(i, j) = row(i)[j]; fills col4row.
  template <typename T, typename RowFn>
  ALIGN_DETR_ALWAYS_INLINE void solve(int64_t n, int64_t m, const RowFn& row) {
    u.assign(n, 0.0);
    v.assign(m, 0.0);
    spc.assign(m, kInf);
    pen.assign(m, 0.0);  // +inf marks a column already scanned in the current search
    path.assign(m, -1);
    row4col.assign(m, -1);
    col4row.assign(n, -1);
    const int64_t n_chunks = (m + kChunk - 1) / kChunk;
    chunk_min.assign(n_chunks, kInf);
    steps = 0;
    double* __restrict__ spc_p = spc.data();
    double* __restrict__ pen_p = pen.data();
    double* __restrict__ v_p = v.data();
    int64_t* __restrict__ path_p = path.data();

    for (int64_t cur = 0; cur < n; ++cur) {
      sr.clear();
      sc.clear();
      double min_val = 0.0;
      int64_t i = cur;
      int64_t sink = -1;
      while (sink < 0) {
        sr.push_back(i);
        ++steps;
        const T* __restrict__ c = row(i);
        const double base = min_val - u[i];
        // Relax every unscanned column through row i and take each chunk's minimum.
        for (int64_t ch = 0; ch < n_chunks; ++ch) {
          const int64_t j0 = ch * kChunk;
          const int64_t j1 = std::min(m, j0 + kChunk);
          double cmin = kInf;
#pragma omp simd reduction(min : cmin)
          for (int64_t j = j0; j < j1; ++j) {
            const double r = base + static_cast<double>(c[j]) - v_p[j] + pen_p[j];
            const bool better = r < spc_p[j];
            spc_p[j] = better ? r : spc_p[j];
            path_p[j] = better ? i : path_p[j];
            const double e = spc_p[j] + pen_p[j];
            cmin = e < cmin ? e : cmin;
          }
          chunk_min[ch] = cmin;
        }
        double lowest = kInf;
        int64_t best_chunk = -1;
        for (int64_t ch = 0; ch < n_chunks; ++ch) {
          if (chunk_min[ch] < lowest) {
            lowest = chunk_min[ch];
            best_chunk = ch;
          }
        }
        // Only reachable with +inf costs, which the caller rules out.
        TORCH_CHECK(best_chunk >= 0, "assign: the assignment problem is infeasible");
        const int64_t j0 = best_chunk * kChunk;
        const int64_t j1 = std::min(m, j0 + kChunk);
        int64_t jmin = -1;
        for (int64_t j = j0; j < j1; ++j) {
          if (spc_p[j] + pen_p[j] == lowest) {
            // Among equal ends prefer a free column: it ends the search.
            if (jmin < 0 || row4col[j] < 0) jmin = j;
            if (row4col[j] < 0) break;
          }
        }
        min_val = lowest;
        pen_p[jmin] = kInf;
        sc.push_back(jmin);
        if (row4col[jmin] < 0) {
          sink = jmin;
        } else {
          i = row4col[jmin];
        }
      }
      // Dual update (spc of a scanned column is frozen at its value when it was scanned).
      u[cur] += min_val;
      for (const int64_t r : sr) {
        if (r != cur) u[r] += min_val - spc_p[col4row[r]];
      }
      for (const int64_t j : sc) v_p[j] -= min_val - spc_p[j];
      // Augment along the path back to cur.
      int64_t j = sink;
      while (true) {
        const int64_t r = path_p[j];
        row4col[j] = r;
        std::swap(col4row[r], j);
        if (r == cur) break;
      }
      for (const int64_t s : sc) pen_p[s] = 0.0;
      std::fill(spc.begin(), spc.end(), kInf);
    }
  }
};

}  // namespace matching
}  // namespace align_detr
