// What the CPU a kernel runs on can do, asked once per process: the AVX-512 subsets the kernels' wide paths
// use (F, BW, VL, DQ), and the two dot-product extensions on top of them. The kernel libraries are built for
// AVX2 and take a wider path (code under a target attribute) only where the CPU reports it.

#pragma once

namespace minaf3_cpu {

inline bool has_avx512() {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  return has;
}

// bf16 dot products (vdpbf16ps).
inline bool has_avx512_bf16() {
  static const bool has = has_avx512() && __builtin_cpu_supports("avx512bf16");
  return has;
}

// int8 dot products (vpdpbusd).
inline bool has_avx512_vnni() {
  static const bool has = has_avx512() && __builtin_cpu_supports("avx512vnni");
  return has;
}

}  // namespace minaf3_cpu
