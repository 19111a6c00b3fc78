// Which x86 SIMD level the CPU kernels use: the best the CPU has, capped by
// LORA_KERNELS_CPU_ISA ("avx512", "avx2" or "scalar"; read once, when the
// first kernel asks). The cap lets a machine with AVX-512 run the code paths
// of one without (the test suite does, together with torch's own switches
// ATEN_CPU_CAPABILITY and ONEDNN_MAX_CPU_ISA); every level gives the same
// bits.
#include "common.h"

#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <string>

namespace lora_kernels {
namespace cpu {
namespace {

CpuIsa hardware_isa() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl"))
    return CpuIsa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return CpuIsa::kAvx2;
#endif
  return CpuIsa::kScalar;
}

CpuIsa requested_cap() {
  const char* env = std::getenv("LORA_KERNELS_CPU_ISA");
  if (!env || !*env || std::strcmp(env, "avx512") == 0) return CpuIsa::kAvx512;
  if (std::strcmp(env, "avx2") == 0) return CpuIsa::kAvx2;
  if (std::strcmp(env, "scalar") == 0) return CpuIsa::kScalar;
  TORCH_CHECK(false, "LORA_KERNELS_CPU_ISA: got '", env,
              "', expected avx512, avx2 or scalar");
}

const char* isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kAvx512: return "avx512";
    case CpuIsa::kAvx2: return "avx2";
    default: return "scalar";
  }
}

// What lora_kernels.info prints: the level used, and why not a higher one.
std::string cpu_isa_status() {
  const CpuIsa hw = hardware_isa(), used = cpu_isa();
  std::string s = isa_name(used);
  if (used < hw) s += std::string(" (capped by LORA_KERNELS_CPU_ISA; the CPU has ") +
                      isa_name(hw) + ")";
  return s;
}

}  // namespace

CpuIsa cpu_isa() {
  static const CpuIsa isa = std::min(hardware_isa(), requested_cap());
  return isa;
}

TORCH_LIBRARY_IMPL(lora_kernels_cpu, CompositeImplicitAutograd, m) {
  m.impl("_cpu_isa", &cpu_isa_status);
}

}  // namespace cpu
}  // namespace lora_kernels
