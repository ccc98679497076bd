// Input checks shared by the schemas' validation code of every op (host only). Each raises a
// c10::Error whose message starts with the op's name and names the offending argument.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace align_detr {

inline void check_floating(const char* op, const at::Tensor& t, const char* name) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name,
              " must be a floating-point tensor, got ", t.scalar_type());
}

inline void check_int64(const char* op, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kLong, op, ": ", name, " must be int64, got ",
              t.scalar_type());
}

// t must be on ref's device (ref_name says which argument ref is).
inline void check_same_device(const char* op, const at::Tensor& t, const char* name,
                              const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ", ref_name,
              " is on ", ref.device(), "; all inputs must be on one device");
}

// Small index tables read on the host (level tables, offsets) may live on the CPU even when
// the data is on a GPU: the host then reads them without waiting for the device.
inline void check_host_or_same_device(const char* op, const at::Tensor& t, const char* name,
                                      const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK(t.device().is_cpu() || t.device() == ref.device(), op, ": ", name, " is on ",
              t.device(), " but ", ref_name, " is on ", ref.device(), "; ", name,
              " must be on the CPU (no device sync) or on ", ref_name, "'s device");
}

// The launchers' common prologue: the kernels read dense row-major buffers.
template <typename... Ts>
void make_contiguous(Ts&... ts) {
  ((ts = ts.contiguous()), ...);
}

// A host (CPU) copy of a small table; a device tensor costs one blocking copy.
inline at::Tensor host_copy(const at::Tensor& t) {
  return t.device().is_cpu() ? t.contiguous() : t.to(at::kCPU).contiguous();
}

}  // namespace align_detr
