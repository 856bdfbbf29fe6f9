// Which build of the row kernels runs: the best one that (1) this library compiled,
// (2) the CPU itself can execute, judged from cpuid, and (3) ATen's CPU capability allows
// (ATEN_CPU_CAPABILITY can lower it). ATen honours ATEN_CPU_CAPABILITY=avx512 even on a
// CPU without AVX-512, so (2) is checked here rather than trusted to ATen.
#pragma once

#include <string>
#include <vector>

namespace rlhf_fast {

// Builds in increasing order of preference; the names are ATen's capability names.
inline const std::vector<std::string>& kernel_build_names() {
  static const std::vector<std::string> names = {"DEFAULT", "AVX2", "AVX512"};
  return names;
}

// The builds compiled into this library that this CPU (and its OS) can execute.
inline std::vector<std::string> runnable_builds() {
  std::vector<std::string> builds = {"DEFAULT"};
#if defined(RLHF_FAST_HAVE_AVX2) || defined(RLHF_FAST_HAVE_AVX512)
  __builtin_cpu_init();
  // GCC's and Clang's checks include the OS's support for the vector registers (XGETBV).
  // The per-ISA files are compiled with -mavx2 -mfma -mf16c (and -mavx512{f,bw,vl,dq}).
#if defined(__clang__)
  const bool f16c = true;  // every CPU with AVX2 has F16C; older Clang cannot test for it
#else
  const bool f16c = __builtin_cpu_supports("f16c");
#endif
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && f16c;
#endif
#ifdef RLHF_FAST_HAVE_AVX2
  if (avx2) builds.push_back("AVX2");
#endif
#ifdef RLHF_FAST_HAVE_AVX512
  if (avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
    builds.push_back("AVX512");
  }
#endif
  return builds;
}

// The preferred build among `runnable` that does not exceed `aten_capability`
// ("DEFAULT", "AVX2", "AVX512"; any other name, e.g. another architecture's, means DEFAULT).
inline std::string choose_build(const std::string& aten_capability, const std::vector<std::string>& runnable) {
  const auto& names = kernel_build_names();
  size_t ceiling = 0;
  for (size_t i = 0; i < names.size(); ++i) {
    if (names[i] == aten_capability) ceiling = i;
  }
  for (size_t i = ceiling + 1; i-- > 0;) {
    for (const auto& build : runnable) {
      if (build == names[i]) return build;
    }
  }
  return names[0];
}

}  // namespace rlhf_fast
