// CUDA launcher of the DETR matching cost.
//
// One thread per (GT, query) pair of the flat output, each image's queries against its own GT
// only (the image of a GT is found by a binary search in gt_offsets, so no cross-image
// [B*Q, sumG] matrix is ever formed). Consecutive threads take consecutive queries of one GT, so
// the output writes are coalesced. The per-pair math is matching_cost_math.h, shared with the
// CPU launcher.
//
// Data-dependent validation (non-finite predictions or GT boxes, labels outside [0, C),
// inconsistent gt_offsets) runs on the device first and sets bits of an error word; the cost
// kernel does nothing when a bit is set (so bad offsets or labels are never used as indices).
// With defer_errors the cost kernel also copies the word into the last element of the output,
// and the op returns without waiting for the device: the caller (the matcher) learns of errors
// from the one device-to-host copy of the costs it makes anyway. Without it the host reads the
// word at the end and raises (the op's only device sync).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>

#include "matching_cost.h"
#include "matching_cost_math.h"

namespace align_detr {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 4096;  // grid-stride loops beyond this

// isfinite, not (v - v) == 0, which fast-math flags (NVCC_FLAGS=--use_fast_math) may fold.
template <typename T>
__device__ __forceinline__ bool finite_dev(T v) {
  return isfinite(v);
}

// Validates everything that indexes memory or would poison the costs. Grid-stride over the
// concatenation [logits | pred boxes | gt boxes | gt labels | gt offsets].
template <typename scalar_t, typename acc_t>
__global__ void matching_cost_check_kernel(const scalar_t* __restrict__ logits,
                                           const acc_t* __restrict__ pboxes,
                                           const acc_t* __restrict__ gboxes,
                                           const int64_t* __restrict__ labels,
                                           const int64_t* __restrict__ offsets, int64_t n_logits,
                                           int64_t n_pboxes, int64_t B, int64_t C, int64_t sumG,
                                           int* __restrict__ error) {
  const int64_t n_gboxes = 4 * sumG;
  const int64_t total = n_logits + n_pboxes + n_gboxes + sumG + (B + 1);
  int bits = 0;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    int64_t j = i;
    if (j < n_logits) {
      if (!finite_dev(static_cast<acc_t>(logits[j]))) bits |= kBadLogits;
      continue;
    }
    j -= n_logits;
    if (j < n_pboxes) {
      if (!finite_dev(pboxes[j])) bits |= kBadPredBoxes;
      continue;
    }
    j -= n_pboxes;
    if (j < n_gboxes) {
      if (!finite_dev(gboxes[j])) bits |= kBadGtBoxes;
      continue;
    }
    j -= n_gboxes;
    if (j < sumG) {
      if (labels[j] < 0 || labels[j] >= C) bits |= kBadLabels;
      continue;
    }
    j -= sumG;  // j in [0, B]
    if ((j == 0 && offsets[0] != 0) || (j > 0 && offsets[j] < offsets[j - 1]) ||
        (j == B && offsets[B] != sumG)) {
      bits |= kBadOffsets;
    }
  }
  if (bits != 0) atomicOr(error, bits);
}

template <typename scalar_t, typename acc_t>
__global__ void matching_cost_kernel(
    const scalar_t* __restrict__ logits, const acc_t* __restrict__ pboxes,
    const acc_t* __restrict__ gboxes, const int64_t* __restrict__ labels,
    const int64_t* __restrict__ offsets, int64_t B, int64_t Q, int64_t C, int64_t sumG,
    acc_t class_weight, acc_t bbox_weight, acc_t giou_weight, acc_t alpha, acc_t gamma,
    const int* __restrict__ error, acc_t* __restrict__ out, bool defer_errors) {
  const int bits = *error;  // written by the check kernel earlier on this stream
  const int64_t total = Q * sumG;
  if (defer_errors && blockIdx.x == 0 && threadIdx.x == 0) out[total] = static_cast<acc_t>(bits);
  if (bits != 0) return;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    // Output i is (GT g, query q) with i = g * Q + q (image blocks are GT-major and laid end
    // to end). The image of GT g is the last b with offsets[b] <= g; empty images have
    // offsets[b] == offsets[b + 1] and are skipped by the search.
    const int64_t g = i / Q;
    const int64_t q = i - g * Q;
    int64_t lo = 0, hi = B;  // invariant: offsets[lo] <= g < offsets[hi]
    while (hi - lo > 1) {
      const int64_t mid = (lo + hi) / 2;
      if (offsets[mid] <= g) {
        lo = mid;
      } else {
        hi = mid;
      }
    }
    const int64_t row = lo * Q + q;

    const acc_t logit = static_cast<acc_t>(logits[row * C + labels[g]]);
    const acc_t* pb = pboxes + row * 4;
    const acc_t* gb = gboxes + g * 4;
    const matching::Box<acc_t> p = matching::make_box(pb[0], pb[1], pb[2], pb[3]);
    const matching::Box<acc_t> gt = matching::make_box(gb[0], gb[1], gb[2], gb[3]);
    out[i] = class_weight * matching::focal_class_cost(logit, alpha, gamma) +
             matching::box_cost(p, gt, bbox_weight, giou_weight);
  }
}

int blocks_for(int64_t n) {
  return static_cast<int>(std::min<int64_t>(kMaxBlocks, (n + kThreads - 1) / kThreads));
}

}  // namespace

at::Tensor matching_cost_cuda(const at::Tensor& pred_logits, const at::Tensor& pred_boxes,
                              const at::Tensor& gt_labels, const at::Tensor& gt_boxes,
                              const at::Tensor& gt_offsets, double class_weight, double bbox_weight,
                              double giou_weight, double alpha, double gamma, bool defer_errors) {
  // The dispatcher picks this kernel when any input is on a GPU; the validation names the
  // argument on the wrong device.
  std::optional<c10::cuda::CUDAGuard> guard;
  if (pred_logits.is_cuda()) guard.emplace(pred_logits.device());
  const MatchingCostInputs in =
      prepare_matching_cost(pred_logits, pred_boxes, gt_labels, gt_boxes, gt_offsets);
  TORCH_CHECK(pred_logits.is_cuda(), "matching_cost: the CUDA kernel got pred_logits on ",
              pred_logits.device());
  const MatchingCostSizes& sz = in.sz;
  const int64_t n_out = sz.Q * sz.sumG;
  at::Tensor out =
      at::empty({n_out + (defer_errors ? 1 : 0)}, pred_logits.options().dtype(in.cost_dtype));
  at::Tensor error = at::zeros({1}, pred_logits.options().dtype(at::kInt));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, in.logits.scalar_type(), "matching_cost_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const int64_t n_logits = sz.B * sz.Q * sz.C;
        const int64_t n_pboxes = sz.B * sz.Q * 4;
        const int64_t n_check = n_logits + n_pboxes + 5 * sz.sumG + sz.B + 1;
        matching_cost_check_kernel<scalar_t, acc_t><<<blocks_for(n_check), kThreads, 0, stream>>>(
            in.logits.const_data_ptr<scalar_t>(), in.boxes.const_data_ptr<acc_t>(),
            in.gt_boxes.const_data_ptr<acc_t>(), in.gt_labels.const_data_ptr<int64_t>(),
            in.gt_offsets.const_data_ptr<int64_t>(), n_logits, n_pboxes, sz.B, sz.C, sz.sumG,
            error.data_ptr<int>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        // Launched even for an empty output when the error word has to be copied out.
        if (n_out > 0 || defer_errors) {
          matching_cost_kernel<scalar_t, acc_t>
              <<<std::max(1, blocks_for(n_out)), kThreads, 0, stream>>>(
                  in.logits.const_data_ptr<scalar_t>(), in.boxes.const_data_ptr<acc_t>(),
                  in.gt_boxes.const_data_ptr<acc_t>(), in.gt_labels.const_data_ptr<int64_t>(),
                  in.gt_offsets.const_data_ptr<int64_t>(), sz.B, sz.Q, sz.C, sz.sumG,
                  static_cast<acc_t>(class_weight), static_cast<acc_t>(bbox_weight),
                  static_cast<acc_t>(giou_weight), static_cast<acc_t>(alpha),
                  static_cast<acc_t>(gamma), error.const_data_ptr<int>(), out.data_ptr<acc_t>(),
                  defer_errors);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
      });
  if (!defer_errors) raise_matching_cost_error(error.item<int>(), sz);  // the one sync
  return out;
}

TORCH_LIBRARY_IMPL(align_detr, CUDA, m) { m.impl("matching_cost", &matching_cost_cuda); }

}  // namespace align_detr
