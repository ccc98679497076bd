// Run-time choice of the x86 instruction set for the CPU loops of every op: the hot loops are
// compiled for AVX-512, AVX2 and baseline x86-64 through target attributes, and the widest
// variant this CPU runs is called.
// ALIGN_DETR_CPU_ISA=baseline|avx2 narrows it (the tests check every variant).
#pragma once

#include <cstdlib>
#include <cstring>

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#define ALIGN_DETR_X86_MULTIVERSION 1
#define ALIGN_DETR_ALWAYS_INLINE __attribute__((always_inline)) inline
#define ALIGN_DETR_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define ALIGN_DETR_TARGET_AVX512 __attribute__((target("avx512f,avx512vl,avx512bw,avx2,fma")))
#else
#define ALIGN_DETR_ALWAYS_INLINE inline
#endif

namespace align_detr {
namespace cpu {

enum class Isa { kBaseline, kAvx2, kAvx512 };

inline Isa pick_isa() {
#ifdef ALIGN_DETR_X86_MULTIVERSION
  Isa best = Isa::kBaseline;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = Isa::kAvx2;
  if (best == Isa::kAvx2 && __builtin_cpu_supports("avx512f") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw")) {
    best = Isa::kAvx512;
  }
  const char* env = std::getenv("ALIGN_DETR_CPU_ISA");
  if (env != nullptr) {
    if (std::strcmp(env, "baseline") == 0) return Isa::kBaseline;
    if (std::strcmp(env, "avx2") == 0 && best != Isa::kBaseline) return Isa::kAvx2;
  }
  return best;
#else
  return Isa::kBaseline;
#endif
}

}  // namespace cpu
}  // namespace align_detr
