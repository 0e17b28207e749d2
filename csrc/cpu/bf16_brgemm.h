// bf16 x bf16 -> fp32 GEMMs on oneDNN's brgemm micro-kernel (at::native::cpublas::brgemm, the one
// ATen's CPU flash attention uses), shared by lle_cpu.cpp and grpo_loss_cpu.cpp. PREPO_HAVE_BRGEMM is
// defined where this ATen build has the bf16 brgemm; bf16_brgemm_usable() says whether this CPU runs it.
#pragma once

#if defined(__x86_64__) || defined(_M_X64)
#include <ATen/native/CPUBlas.h>
#if defined(CPUBLAS_BRGEMM_BF16BF16F32)
#define PREPO_HAVE_BRGEMM
#endif
#endif

#if defined(PREPO_HAVE_BRGEMM)
#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <exception>
#include <string>
#include <vector>

namespace prepo_kernels {
namespace brgemm {

// brgemm computes C (+)= A B (fp32 C) for a row-major bf16 A and a bf16 B in VNNI layout; pack_vnni
// builds that layout itself (cpublas::pack only exists with AMX). Single-threaded: callers split the
// work across threads and call brgemm_release() on each thread when done.
using at::BFloat16;
constexpr int64_t kPanel = 64;      // columns of one packed B panel (one brgemm call's N)
constexpr int64_t kBlockRows = 64;  // rows of A per brgemm call (one call's M)

inline int64_t round_even(int64_t k) { return (k + 1) / 2 * 2; }
inline int64_t packed_size(int64_t K, int64_t N) { return (N + kPanel - 1) / kPanel * kPanel * round_even(K); }

// B [K, N] with B[k, n] = src[k * ks + n * ns] -> panels of kPanel columns in VNNI pairs:
// dst[p][k / 2][j][k % 2] = B[k, p * kPanel + j], zero-padded to an even K and whole panels.
inline void pack_vnni(const BFloat16* src, int64_t K, int64_t N, int64_t ks, int64_t ns, BFloat16* dst) {
  const int64_t K2 = round_even(K) / 2;
  for (int64_t p = 0; p * kPanel < N; ++p) {
    for (int64_t k2 = 0; k2 < K2; ++k2) {
      BFloat16* d = dst + (p * K2 + k2) * 2 * kPanel;
      for (int64_t j = 0; j < kPanel; ++j) {
        const int64_t n = p * kPanel + j;
        for (int64_t h = 0; h < 2; ++h) {
          const int64_t k = 2 * k2 + h;
          d[2 * j + h] = (n < N && k < K) ? src[k * ks + n * ns] : BFloat16(0.0f);
        }
      }
    }
  }
}

// C [M, N] (+)= A [M, K] B for B packed by pack_vnni; A has round_even(K) columns (a zero column
// when K is odd), ld_a apart; C rows are ld_c apart.
inline void brgemm_bf16(int64_t M, int64_t N, int64_t K, const BFloat16* A, int64_t ld_a, const BFloat16* Bp, float* C,
                 int64_t ld_c, bool accumulate) {
  const int64_t Ke = round_even(K);
  for (int64_t p = 0; p * kPanel < N; ++p) {
    const int64_t nb = std::min(kPanel, N - p * kPanel);
    for (int64_t m0 = 0; m0 < M; m0 += kBlockRows) {
      at::native::cpublas::brgemm(std::min(kBlockRows, M - m0), nb, Ke, ld_a, kPanel, ld_c, accumulate,
                                  A + m0 * ld_a, Bp + p * Ke * kPanel, C + m0 * ld_c + p * kPanel, true);
    }
  }
}

// Whether this CPU / ATen build runs the bf16 brgemm with VNNI operands (oneDNN ukernels, AVX-512
// bf16 or AMX): one tiny call, checked once. PREPO_CPU_BF16_BRGEMM=0 forces the upcast path.
inline bool bf16_brgemm_usable() {
  static const bool ok = [] {
    try {
      const BFloat16 a[2] = {BFloat16(1.0f), BFloat16(2.0f)};
      std::vector<BFloat16> b(2 * kPanel, BFloat16(0.0f));
      b[0] = BFloat16(3.0f);
      b[1] = BFloat16(4.0f);
      float c = 0.0f;
      at::native::cpublas::brgemm(1, 1, 2, 2, kPanel, 1, false, a, b.data(), &c, true);
      at::native::cpublas::brgemm_release(true);
      return c == 11.0f;
    } catch (const std::exception&) {
      return false;
    }
  }();
  const char* env = std::getenv("PREPO_CPU_BF16_BRGEMM");
  return ok && !(env != nullptr && std::string(env) == "0");
}

}  // namespace brgemm
}  // namespace prepo_kernels
#endif  // PREPO_HAVE_BRGEMM
