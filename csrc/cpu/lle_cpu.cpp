// CPU device of the shared driver (csrc/lle_driver.h) for prepo_kernels::lle_forward / lle_backward
// (schemas in csrc/ops.cpp, semantics in prepo_kernels/backends/base.py): the tile-GEMM engines, the
// fused element loops of the two hooks and the threading.
//
//   tile statistics: per-row online statistics of a logit tile, merged across vocab tiles in double:
//             m = running max, s = sum exp(z - m), t = sum exp(z - m) (z - m), z_y
//             lse = m + log s, entropy = log s - t / s   (stable for |z| ~ 1e4)
//   tile gradient: dz written over the logit tile in place, db_tile += sum_rows dz.
// Engines: fp32 / fp64 tiles on ATen BLAS (MKL / OpenBLAS); bf16 tiles on oneDNN's bf16 brgemm with
// fp32 accumulation (Bf16Tiles), or upcast to fp32 where that is not available; fp16 upcast to fp32.
//
// Threading: the vocab tiles are split into one contiguous partition per thread; each thread runs
// single-threaded GEMMs and the fused loops on its own tiles (its own dW rows, its own row
// statistics / private dh, merged in partition order at the end). One synchronization per op (per
// row chunk in backward) instead of several per tile, and results are bitwise reproducible for a
// given thread count.
//
// The element loops are plain C++ written so that gcc / clang auto-vectorize them at -O3 for the
// baseline x86-64 ISA (a branch-free polynomial exp, selects instead of branches, `omp simd`
// reductions; built with -fopenmp -fno-trapping-math). With gcc on x86-64 Linux the float loops are
// also cloned for x86-64-v3 (AVX2+FMA) and x86-64-v4 (AVX-512) via target_clones, and the clone is
// picked at load time from the CPU's features: the binary runs on any x86-64 CPU (no -march=native).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../lle_driver.h"
#include "fast_exp.h"

#include "bf16_brgemm.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

namespace prepo_kernels {
namespace {

using at::Tensor;

constexpr float kNegInfF = -std::numeric_limits<float>::infinity();
constexpr double kClampD = -1.0e4;

// ---------------------------------------------------------------------------------------------
// tile sizes (env overrides for tuning: PREPO_CPU_ROW_TILE, PREPO_CPU_VOCAB_TILE)

int64_t env_int(const char* name, int64_t fallback) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return fallback;
  char* end = nullptr;
  long long x = std::strtoll(v, &end, 10);
  return (end != v && x > 0) ? static_cast<int64_t>(x) : fallback;
}

// Each thread holds one [row_tile, vocab_tile] logit tile; together they stay within kTileBytes
// (2 threads: 2 x [2048, 1024] fp32 = 16 MB). Larger row tiles mean fewer read-modify-writes of
// the dW tile in backward, larger vocab tiles fewer of dh; both give BLAS larger problems.
constexpr int64_t kTileBytes = int64_t(32) << 20;

// About 1024 vocab rows per tile, sized so that every thread gets the same number of tiles (and at
// least one: a small vocabulary is still split across the threads).
int64_t vocab_tile(int64_t V, int64_t threads) {
  const int64_t env = env_int("PREPO_CPU_VOCAB_TILE", 0);
  if (env > 0) return std::max<int64_t>(1, std::min(V, env));
  const int64_t P = std::max<int64_t>(1, threads);
  const int64_t per_thread = std::max<int64_t>(1, (V + P * 1024 - 1) / (P * 1024));
  return std::max<int64_t>(1, (V + P * per_thread - 1) / (P * per_thread));
}

int64_t row_tile(int64_t n, int64_t vt, int64_t threads, int64_t elem_size) {
  int64_t fit = kTileBytes / std::max<int64_t>(1, threads * vt * elem_size);
  fit = std::max<int64_t>(64, std::min<int64_t>(2048, fit));
  return std::max<int64_t>(1, std::min(n, env_int("PREPO_CPU_ROW_TILE", fit)));
}

// ---------------------------------------------------------------------------------------------
// float element kernels

// Forward statistics of one row segment of raw logits (h W^T): with z_v = (raw_v + b_v) * sc (b may
// be null) returns m = max z and, relative to it, s = sum e^{z-m}, t = sum e^{z-m} (z-m).
// An all -inf segment gives m = -inf, s = t = 0. `omp simd` reductions let the compiler vectorize
// (it may reorder the float sums). raw is not modified.
PREPO_CLONES
void row_forward_f32(const float* __restrict raw, const float* __restrict b, int64_t len, float sc, float* out_m,
                     float* out_s, float* out_t) {
  float mx = kNegInfF;
  if (b != nullptr) {
#pragma omp simd reduction(max : mx)
    for (int64_t i = 0; i < len; ++i) {
      const float v = raw[i] + b[i];
      mx = v > mx ? v : mx;
    }
  } else {
#pragma omp simd reduction(max : mx)
    for (int64_t i = 0; i < len; ++i) mx = raw[i] > mx ? raw[i] : mx;
  }
  const float m = mx * sc;  // sc > 0
  *out_m = m;
  if (!(m > kNegInfF)) {  // all -inf (or NaN): contributes nothing
    *out_s = 0.0f;
    *out_t = 0.0f;
    return;
  }
  // d = (raw - max) * sc, not raw * sc - m: the compiler may fuse the latter into an fma, which
  // leaves d != 0 at the max itself, so s < 1 and log-probs > 0 could come out
  float s = 0.0f, t = 0.0f;
  if (b != nullptr) {
#pragma omp simd reduction(+ : s, t)
    for (int64_t i = 0; i < len; ++i) {
      const float d = (raw[i] + b[i] - mx) * sc;
      const float dc = d > kExpLowF ? d : kExpLowF;
      const float e = d > kExpLowF ? exp_f32(dc) : 0.0f;
      s += e;
      t += e * dc;
    }
  } else {
#pragma omp simd reduction(+ : s, t)
    for (int64_t i = 0; i < len; ++i) {
      const float d = (raw[i] - mx) * sc;
      const float dc = d > kExpLowF ? d : kExpLowF;
      const float e = d > kExpLowF ? exp_f32(dc) : 0.0f;
      s += e;
      t += e * dc;
    }
  }
  *out_s = s;
  *out_t = t;
}

// Backward of one row segment, in place: raw logits (h W^T) in, dz * sc out, where
// z = (raw + b) * sc, p = exp(z - lse), dz = -p (g + e (z - lse + H))  (the + g at the target is
// added by the caller).
PREPO_CLONES
void row_backward_f32(float* __restrict z, const float* __restrict b, int64_t len, float sc, float lse, float g,
                      float e, float H) {
  const float c0 = (g + e * H) * sc;
  const float es = e * sc;
  const float nl = -lse;
  // z = (raw + b) * sc rounded in a pass of its own, then d = z - lse: in one expression the
  // compiler may fuse raw * sc - lse into an fma, so that the forward's max logit gets p != 1
  // (a gradient where there is none, e.g. with V = 1)
  if (b != nullptr) {
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) z[i] = (z[i] + b[i]) * sc;
  } else {
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) z[i] = z[i] * sc;
  }
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) {
    const float d = z[i] + nl;
    const float dc = d > kExpLowF ? d : kExpLowF;
    const float p = d > kExpLowF ? exp_f32(dc) : 0.0f;
    z[i] = -p * (c0 + es * dc);
  }
}

// ---------------------------------------------------------------------------------------------
// double element kernels (gradcheck / oracles: plain loops, std::exp)

void row_forward_f64(const double* raw, const double* b, int64_t len, double sc, double* out_m, double* out_s,
                     double* out_t) {
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t i = 0; i < len; ++i) {
    const double v = (raw[i] + (b != nullptr ? b[i] : 0.0)) * sc;
    m = m > v ? m : v;
  }
  *out_m = m;
  double s = 0.0, t = 0.0;
  if (m > -std::numeric_limits<double>::infinity()) {
    for (int64_t i = 0; i < len; ++i) {
      double d = (raw[i] + (b != nullptr ? b[i] : 0.0)) * sc - m;
      d = d < kClampD ? kClampD : d;
      double ex = std::exp(d);
      s += ex;
      t += ex * d;
    }
  }
  *out_s = s;
  *out_t = t;
}

void row_backward_f64(double* z, const double* b, int64_t len, double sc, double lse, double g, double e,
                      double H) {
  for (int64_t i = 0; i < len; ++i) {
    double d = (z[i] + (b != nullptr ? b[i] : 0.0)) * sc - lse;
    d = d < kClampD ? kClampD : d;
    double p = std::exp(d);
    z[i] = -p * (g + e * (d + H)) * sc;
  }
}

inline void row_forward(const float* z, const float* b, int64_t len, float sc, float* m, float* s, float* t) {
  row_forward_f32(z, b, len, sc, m, s, t);
}
inline void row_forward(const double* z, const double* b, int64_t len, double sc, double* m, double* s, double* t) {
  row_forward_f64(z, b, len, sc, m, s, t);
}
inline void row_backward(float* z, const float* b, int64_t len, float sc, float lse, float g, float e, float H) {
  row_backward_f32(z, b, len, sc, lse, g, e, H);
}
inline void row_backward(double* z, const double* b, int64_t len, double sc, double lse, double g, double e,
                         double H) {
  row_backward_f64(z, b, len, sc, lse, g, e, H);
}

#if defined(PREPO_HAVE_BRGEMM)
// bf16 tiles at the speed of the bf16 matmuls (csrc/cpu/bf16_brgemm.h). dz is rounded to bf16 for the
// two backward GEMMs (as Liger / CCE do); the logits, the softmax statistics, dz, dh and dW stay fp32.
using namespace brgemm;

// hidden [n, D] packed once per backward as the B operand of dW_tile += dz^T h_block: one
// packed_size(Nt, D) block per row tile.
Tensor pack_hidden(const Tensor& hidden, int64_t Nt) {
  const int64_t n = hidden.size(0), D = hidden.size(1), blocks = (n + Nt - 1) / Nt;
  Tensor out = at::empty({blocks * packed_size(Nt, D)}, hidden.options());
  const BFloat16* h = hidden.data_ptr<BFloat16>();
  BFloat16* o = out.data_ptr<BFloat16>();
  at::parallel_for(0, blocks, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; ++b)
      pack_vnni(h + b * Nt * D, std::min(Nt, n - b * Nt), D, D, 1, o + b * packed_size(Nt, D));
  });
  return out;
}

class Bf16Tiles {
 public:
  // hidden_packed: pack_hidden(hidden, Nt), or undefined when only logits() is called (forward)
  Bf16Tiles(const Tensor& hidden, const Tensor& weight, const Tensor& hidden_packed, const Tiling& t)
      : h_(hidden.data_ptr<BFloat16>()), w_(weight.data_ptr<BFloat16>()), D_(hidden.size(1)), Nt_(t.Nt),
        hp_(hidden_packed.defined() ? hidden_packed.data_ptr<BFloat16>() : nullptr) {
    const int64_t Nt = t.Nt, Vt = t.Vt;
    const auto opts = hidden.options();
    wt_pack_ = at::empty({packed_size(D_, Vt)}, opts);
    if (hp_ != nullptr) {
      w_pack_ = at::empty({packed_size(Vt, D_)}, opts);
      dz_ = at::empty({Nt * round_even(Vt)}, opts);
      dzt_ = at::empty({Vt * round_even(Nt)}, opts);
    }
  }
  ~Bf16Tiles() { at::native::cpublas::brgemm_release(true); }
  void set_tile(int64_t v0, int64_t vt) {
    vt_ = vt;
    const BFloat16* W = w_ + v0 * D_;
    pack_vnni(W, D_, vt, 1, D_, wt_pack_.data_ptr<BFloat16>());  // B = W_tile^T [D, vt]
    if (hp_ != nullptr) pack_vnni(W, vt, D_, D_, 1, w_pack_.data_ptr<BFloat16>());  // B = W_tile [vt, D]
  }
  void logits(int64_t r0, int64_t nt, Tensor& Z) {
    brgemm_bf16(nt, vt_, D_, h_ + r0 * D_, D_, wt_pack_.data_ptr<BFloat16>(), Z.data_ptr<float>(), vt_, false);
  }
  void grads(int64_t r0, int64_t nt, const Tensor& Z, Tensor dh, Tensor dWt, bool accumulate) {
    const int64_t vte = round_even(vt_), nte = round_even(nt);
    BFloat16* dz = dz_.data_ptr<BFloat16>();
    BFloat16* dzt = dzt_.data_ptr<BFloat16>();
    round_dz(Z.data_ptr<float>(), nt, dz, vte, dzt, nte);
    brgemm_bf16(nt, D_, vt_, dz, vte, w_pack_.data_ptr<BFloat16>(), dh.data_ptr<float>(), D_, true);
    brgemm_bf16(vt_, D_, nt, dzt, nte, hp_ + (r0 / Nt_) * packed_size(Nt_, D_), dWt.data_ptr<float>(), D_,
                accumulate);
  }

 private:
  // dz [nt, vt] fp32 -> bf16 twice: dz [nt, vte] and its transpose dzt [vt, nte], the padding zero
  void round_dz(const float* z, int64_t nt, BFloat16* dz, int64_t vte, BFloat16* dzt, int64_t nte) const {
    for (int64_t i = 0; i < nt; ++i) {
      const float* zr = z + i * vt_;
      BFloat16* dr = dz + i * vte;
      for (int64_t c = 0; c < vt_; ++c) {
        const BFloat16 b(zr[c]);
        dr[c] = b;
        dzt[c * nte + i] = b;
      }
      if (vte > vt_) dr[vt_] = BFloat16(0.0f);
    }
    if (nte > nt)
      for (int64_t c = 0; c < vt_; ++c) dzt[c * nte + nt] = BFloat16(0.0f);
  }

  const BFloat16* h_;
  const BFloat16* w_;
  const int64_t D_, Nt_;
  const BFloat16* hp_;
  int64_t vt_ = 0;
  Tensor wt_pack_, w_pack_, dz_, dzt_;
};
#endif  // PREPO_HAVE_BRGEMM

// ---------------------------------------------------------------------------------------------
// the CPU device of the shared driver (csrc/lle_driver.h)

// Merge a segment's (mt, st, tt) into the running statistics (m, s, t) of row i.
inline void merge_stats(double* m, double* s, double* t, int64_t i, double mt, double st, double tt) {
  if (!(st > 0)) return;  // segment all -inf
  const double M = m[i];
  if (mt <= M) {
    const double a = std::exp(mt - M);
    s[i] += a * st;
    t[i] += a * (tt + (mt - M) * st);
  } else {
    const double S = s[i];
    const double a = std::exp(M - mt);  // 0 while M = -inf
    s[i] = a * S + st;
    t[i] = (S > 0 ? a * (t[i] + (M - mt) * S) : 0.0) + tt;
    m[i] = mt;
  }
}

// Bytes of private grad_hidden accumulators (partitions 1..P-1) the backward may hold at once.
constexpr int64_t kPrivateBytes = int64_t(64) << 20;

struct CpuDevice {
  static constexpr c10::DeviceType kType = c10::DeviceType::CPU;

  // One partition per thread (each runs single-threaded BLAS on its own tiles: one synchronization
  // per op, or per row chunk in backward, instead of several per tile).
  static Tiling tiling(int64_t n, int64_t D, int64_t V, int64_t acc_bytes) {
    Tiling t;
    t.Vt = vocab_tile(V, at::get_num_threads());
    t.ntiles = (V + t.Vt - 1) / t.Vt;
    t.P = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), t.ntiles));
    t.Nt = row_tile(n, t.Vt, t.P, acc_bytes);
    t.R = n;
    if (t.P > 1) {
      const int64_t cap = kPrivateBytes / ((t.P - 1) * D * acc_bytes);
      t.R = std::min(n, std::max(t.Nt, cap / t.Nt * t.Nt));
    }
    return t;
  }

  // Row statistics merge in double whatever the dtype (stable entropy for |z| ~ 1e4).
  static at::ScalarType stats_dtype(at::ScalarType /*acc*/) { return at::kDouble; }

  template <typename F>
  static void parallel(int64_t P, const F& f) {
    at::parallel_for(0, P, 1, [&](int64_t lo, int64_t hi) {
      const at::AutoDispatchBelowADInplaceOrView below_autograd;
      for (int64_t p = lo; p < hi; ++p) f(p);
    });
  }

  // bf16 with an even D on a CPU whose oneDNN runs the bf16 brgemm: Bf16Tiles; else BlasTiles.
  template <typename acc_t, typename Run>
  static void with_engine(const Operands& o, bool backward, const Tiling& t, Run&& run) {
#if defined(PREPO_HAVE_BRGEMM)
    if constexpr (std::is_same_v<acc_t, float>) {
      if (o.hidden.scalar_type() == at::kBFloat16 && o.D % 2 == 0 && bf16_brgemm_usable()) {
        const Tensor packed = backward ? pack_hidden(o.hidden, t.Nt) : Tensor();
        run([&] { return Bf16Tiles(o.hidden, o.weight, packed, t); });
        return;
      }
    }
#endif
    run([&] { return BlasTiles<acc_t>(o.hidden, o.weight, t); });
  }

  template <typename acc_t>
  static void tile_stats(const Operands& o, int64_t v0, int64_t r0, const Tensor& Z, const Tensor& stats_p,
                         const Tensor& zy) {
    const int64_t nt = Z.size(0), vt = Z.size(1), n = o.n;
    const acc_t* zp = Z.data_ptr<acc_t>();
    const acc_t* itp = o.inv_temp.data_ptr<acc_t>();
    const acc_t* bt = o.bias.defined() ? o.bias.data_ptr<acc_t>() + v0 : nullptr;
    const int64_t* y = o.targets.data_ptr<int64_t>();
    double* m = stats_p.data_ptr<double>();
    double* zyp = zy.data_ptr<double>();
    for (int64_t li = 0; li < nt; ++li) {
      const int64_t i = r0 + li;
      const acc_t* row = zp + li * vt;
      acc_t mt, st, tt;
      row_forward(row, bt, vt, itp[i], &mt, &st, &tt);
      merge_stats(m, m + n, m + 2 * n, i, mt, st, tt);
      const int64_t yl = y[i] - v0;
      if (yl >= 0 && yl < vt)  // rounded as the row's max was (m = max * sc in acc_t): z_y <= m
        zyp[i] = static_cast<double>(static_cast<acc_t>((row[yl] + (bt != nullptr ? bt[yl] : acc_t(0))) * itp[i]));
    }
  }

  template <typename acc_t>
  static void tile_grad(const Operands& o, int64_t v0, int64_t r0, Tensor& Z, const Tensor& grad_bias) {
    const int64_t nt = Z.size(0), vt = Z.size(1);
    acc_t* zp = Z.data_ptr<acc_t>();
    const acc_t* itp = o.inv_temp.data_ptr<acc_t>();
    const acc_t* gp = o.g.data_ptr<acc_t>();
    const acc_t* lsep = o.lse.data_ptr<acc_t>();
    const acc_t* ep = o.e.defined() ? o.e.data_ptr<acc_t>() : nullptr;
    const acc_t* Hp = o.e.defined() ? o.H.data_ptr<acc_t>() : nullptr;
    const acc_t* bt = o.bias.defined() ? o.bias.data_ptr<acc_t>() + v0 : nullptr;
    const int64_t* y = o.targets.data_ptr<int64_t>();
    for (int64_t li = 0; li < nt; ++li) {
      const int64_t i = r0 + li;
      acc_t* row = zp + li * vt;
      row_backward(row, bt, vt, itp[i], lsep[i], gp[i], ep != nullptr ? ep[i] : acc_t(0),
                   ep != nullptr ? Hp[i] : acc_t(0));
      const int64_t yl = y[i] - v0;
      if (yl >= 0 && yl < vt) row[yl] += gp[i] * itp[i];
    }
    if (bt != nullptr) {  // this partition owns these columns of grad_bias
      acc_t* db = grad_bias.data_ptr<acc_t>() + v0;
      for (int64_t li = 0; li < nt; ++li) {
        const acc_t* row = zp + li * vt;
        for (int64_t c = 0; c < vt; ++c) db[c] += row[c];
      }
    }
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(prepo_kernels, CPU, m) {
  m.impl("lle_forward", &lle_forward<CpuDevice>);
  m.impl("lle_backward", &lle_backward<CpuDevice>);
}

}  // namespace prepo_kernels
