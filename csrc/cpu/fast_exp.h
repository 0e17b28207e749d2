// Vectorizable float exp and the per-ISA cloning the CPU element loops use.
//
// exp_f32 is a branch-free Cephes polynomial, shared by lle_cpu.cpp and grpo_loss_cpu.cpp. Loops that
// call it auto-vectorize at -O3 (built with -fno-trapping-math); functions marked PREPO_CLONES are
// also compiled for x86-64-v3 (AVX2 + FMA) and x86-64-v4 (AVX-512), the clone picked at load time.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) && \
    !defined(PREPO_NO_TARGET_CLONES)
#define PREPO_CLONES __attribute__((target_clones("default", "arch=x86-64-v3", "arch=x86-64-v4")))
#else
#define PREPO_CLONES
#endif

#if defined(__GNUC__) || defined(__clang__)
#define PREPO_ALWAYS_INLINE __attribute__((always_inline)) inline
#else
#define PREPO_ALWAYS_INLINE inline
#endif

namespace prepo_kernels {

// Below this exp(x) is taken as exactly 0 (e^-87 ~ 1.6e-38 next to the max term's 1); callers
// clamp x from below first, so a -inf input never gives inf * 0 = NaN, and select its contribution
// away to an exact 0.
constexpr float kExpLowF = -87.0f;

// exp(x) for x in [-87, 88] with < 1.5 ulp error.
PREPO_ALWAYS_INLINE float exp_f32(float x) {
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer kept in the low bits
  const float t = x * 1.44269504088896341f + magic;
  const float k = t - magic;
  float r = x - k * 0.693359375f;
  r = r - k * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = (p * (r * r) + r) + 1.0f;
  uint32_t tb;
  std::memcpy(&tb, &t, sizeof(tb));
  const uint32_t sb = (tb + (127u - 0x4B400000u)) << 23;  // bits of 2^k
  float scale;
  std::memcpy(&scale, &sb, sizeof(scale));
  return y * scale;
}

}  // namespace prepo_kernels
