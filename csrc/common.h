// Small helpers shared by every op of align_detr._C (host and device).
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define ALIGN_DETR_HD __host__ __device__ __forceinline__
#else
#define ALIGN_DETR_HD inline
#endif

namespace align_detr {

// floor() that picks the float or double overload on host and device alike.
ALIGN_DETR_HD float floor_hd(float x) { return ::floorf(x); }
ALIGN_DETR_HD double floor_hd(double x) { return ::floor(x); }

}  // namespace align_detr
