// prepo_kernels::grpo_loss_fwdbwd on CPU: the fused linear GRPO loss's forward and gradients in one
// call, at three matmuls of [n, D] x [D, V] (contract and formulas: prepo_kernels/grpo_backends.py).
//
// The rows run in chunks of chunk_rows (the caller bounds a chunk's logits). For each chunk of c rows
// the logits are held vocab-major, ZT [V, c] (MKL runs W h^T at 256 rows 1.5x faster than h W^T):
//   1. ZT = W h_chunk^T                                     (matmul 1, ATen BLAS, all threads)
//   2. one OpenMP pass over blocks of 16 token columns, vectorized across the tokens of a vocab row:
//      z = (ZT + b) * inv_temp, each token's max, sum e^{z-m} (and sum e^{z-m}(z-m) for the
//      entropy), lse, logprob = z_y - lse, the surrogate's gradient g = dL/dlogprob from the token's
//      own ratio / advantage / clip range, and ZT <- dL/dz * inv_temp = g (1[v=y] - p_v) * inv_temp
//      in place;
//   3. dh_chunk = ZT^T W                                    (matmul 2)
//   4. dW += ZT h_chunk, db += row sums of ZT               (matmul 3)
// Nothing is recomputed. fp32 / fp64 run their GEMMs in their own dtype on the whole vocabulary.
// bf16 / fp16 run them in fp32 (on CPUs without native bf16 GEMMs, ATen's bf16 matmul is several
// times slower than fp32): h_chunk is upcast once per chunk, W one vocab tile of tile_rows rows at a
// time into a buffer (the caller sizes it: prepo_kernels/grpo_backends.py), and each vocab tile of
// dW is upcast into a tile-sized fp32 buffer, accumulated there by the GEMM and rounded back to the
// weight's dtype (one rounding per row chunk). No [V, D] fp32 accumulator: the memory of
// linear_logprob_entropy's backward, which rounds each dW tile once because it runs vocab tiles
// outermost; here the row chunks are outermost (a token's full logits give its loss gradient), so
// a tile is revisited once per chunk (Liger's fused linear losses also accumulate grad_weight in
// the weight's dtype).
//
// Registers its own schema (TORCH_LIBRARY_FRAGMENT), so csrc/ops.cpp is untouched.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

#include "fast_exp.h"

namespace prepo_kernels {
namespace {

using at::Tensor;

// The per-row scalars of the surrogate (prepo.loss.grpo_loss): the loss is -scale * sum surr.
// on_policy: no old log-probs, the ratio is exactly 1 (old = the new log-prob, detached).
struct Surrogate {
  double scale, eps_low, eps_high;
  bool on_policy;
  // dL/dlogprob for one token: -scale * A * r where min(r A, clip(r) A) takes the unclipped branch.
  template <typename T>
  T grad(T logprob, T old, T adv) const {
    const T r = on_policy ? T(1) : std::exp(logprob - old);
    const T clipped_r = std::min(std::max(r, T(1 - eps_low)), T(1 + eps_high));
    const bool clipped = clipped_r * adv < r * adv;
    return clipped ? T(0) : T(-scale) * adv * r;
  }
};

// exp(d) for d <= 0, exactly 0 below the clamp (a -inf logit gives 0, never NaN).
PREPO_ALWAYS_INLINE float clamped_exp(float d) { return d > kExpLowF ? exp_f32(d > kExpLowF ? d : kExpLowF) : 0.0f; }
PREPO_ALWAYS_INLINE double clamped_exp(double d) { return d > -1.0e4 ? std::exp(d) : 0.0; }

// Token columns one call of grpo_cols handles: 16 fp32 = one cache line of each vocab row.
constexpr int64_t kCols = 16;
// Vocab rows summed on their own before their sum joins the token's total (see grpo_cols).
constexpr int64_t kSumRows = 128;

// The per-token inputs and outputs of one chunk, each indexed by the token's column in ZT.
template <typename T>
struct ChunkRows {
  const T* inv_temp;
  const int64_t* target;
  const T* old;  // nullptr: on-policy
  const T* adv;
  T* logprob;
  T* entropy;  // nullptr: not asked for
};

// For the token columns [j0, j0 + w) of ZT [V, c] (scaled logits z) and their maxima mx: sum[k] =
// sum_v e^{z-m}, tsum[k] = sum_v e^{z-m}(z-m) (the entropy's), both added to. Summed in blocks of
// kSumRows vocab rows, then the blocks' sums: a token's sum runs sequentially down the vocabulary,
// and one long fp32 sum's rounding error grows with V (~1e-5 relative at V = 150k).
template <typename T>
PREPO_ALWAYS_INLINE void sum_exps(const T* __restrict ZT, int64_t c, int64_t V, int64_t j0, int64_t w,
                                  const T* mx, T* sum, T* tsum) {
  for (int64_t v0 = 0; v0 < V; v0 += kSumRows) {
    T bsum[kCols] = {}, btsum[kCols] = {};
    for (int64_t v = v0; v < std::min(V, v0 + kSumRows); ++v) {
      const T* __restrict z = ZT + v * c + j0;
#pragma omp simd
      for (int64_t k = 0; k < w; ++k) {
        const T d = z[k] - mx[k];
        const T e = clamped_exp(d);
        bsum[k] += e;
        btsum[k] += e > 0 ? e * d : T(0);
      }
    }
    for (int64_t k = 0; k < w; ++k) {
      sum[k] += bsum[k];
      tsum[k] += btsum[k];
    }
  }
}

// Step 2 for the token columns [j0, j0 + w), w <= kCols, of the chunk's vocab-major logits ZT [V, c]
// (token j's logit for vocab row v at ZT[v * c + j]): raw logits in, dL/dz * inv_temp out (when
// grad). Three sweeps down the vocabulary, each over w contiguous floats per row (vectorized across
// tokens): scale and max; sum e^{z-m} and sum e^{z-m}(z-m); dz.
template <typename T>
PREPO_ALWAYS_INLINE void grpo_cols(T* __restrict ZT, int64_t c, const T* __restrict b, int64_t V,
                                   const ChunkRows<T>& r, const Surrogate& s, bool grad, int64_t j0, int64_t w) {
  T sc[kCols], mx[kCols], sum[kCols], tsum[kCols], coef[kCols], lse[kCols];
  for (int64_t k = 0; k < w; ++k) {
    sc[k] = r.inv_temp[j0 + k];
    mx[k] = -std::numeric_limits<T>::infinity();
    sum[k] = tsum[k] = 0;
  }
  for (int64_t v = 0; v < V; ++v) {
    T* __restrict z = ZT + v * c + j0;
    const T bv = b != nullptr ? b[v] : T(0);
#pragma omp simd
    for (int64_t k = 0; k < w; ++k) {
      z[k] = (z[k] + bv) * sc[k];
      mx[k] = z[k] > mx[k] ? z[k] : mx[k];
    }
  }
  sum_exps(ZT, c, V, j0, w, mx, sum, tsum);
  T g[kCols];
  for (int64_t k = 0; k < w; ++k) {
    const int64_t j = j0 + k;
    const T log_sum = std::log(sum[k]);
    lse[k] = mx[k] + log_sum;
    if (r.entropy != nullptr) r.entropy[j] = log_sum - tsum[k] / sum[k];
    r.logprob[j] = ZT[r.target[j] * c + j] - lse[k];
    g[k] = s.grad(r.logprob[j], r.old != nullptr ? r.old[j] : T(0), r.adv[j]);
    coef[k] = -g[k] * sc[k];  // 0 for a clipped token: its column of dz is all zeros
  }
  if (!grad) return;
  for (int64_t v = 0; v < V; ++v) {
    T* __restrict z = ZT + v * c + j0;
#pragma omp simd
    for (int64_t k = 0; k < w; ++k) z[k] = coef[k] * clamped_exp(z[k] - lse[k]);
  }
  for (int64_t k = 0; k < w; ++k) ZT[r.target[j0 + k] * c + j0 + k] += g[k] * sc[k];
}

// Step 2 for column blocks [lo, hi) of kCols tokens; fp32 is cloned per ISA (fast_exp.h).
template <typename T>
PREPO_ALWAYS_INLINE void grpo_blocks(T* ZT, int64_t c, const T* b, int64_t V, const ChunkRows<T>& r,
                                     const Surrogate& s, bool grad, int64_t lo, int64_t hi) {
  for (int64_t blk = lo; blk < hi; ++blk) {
    const int64_t j0 = blk * kCols;
    grpo_cols(ZT, c, b, V, r, s, grad, j0, std::min(kCols, c - j0));
  }
}

PREPO_CLONES
void grpo_blocks_f32(float* ZT, int64_t c, const float* b, int64_t V, const ChunkRows<float>& r,
                     const Surrogate& s, bool grad, int64_t lo, int64_t hi) {
  grpo_blocks(ZT, c, b, V, r, s, grad, lo, hi);
}

inline void grpo_rows(float* ZT, int64_t c, const float* b, int64_t V, const ChunkRows<float>& r,
                      const Surrogate& s, bool grad, int64_t lo, int64_t hi) {
  grpo_blocks_f32(ZT, c, b, V, r, s, grad, lo, hi);
}
inline void grpo_rows(double* ZT, int64_t c, const double* b, int64_t V, const ChunkRows<double>& r,
                      const Surrogate& s, bool grad, int64_t lo, int64_t hi) {
  grpo_blocks(ZT, c, b, V, r, s, grad, lo, hi);
}

// The GEMMs of one chunk in the accumulation dtype. For a weight already in that dtype they run on
// the whole vocabulary and dW accumulates in place; otherwise W is upcast and dW computed one
// tile of tile_rows vocab rows at a time, each tile added to the low-precision dW (see the header).
class ChunkGemms {
 public:
  ChunkGemms(const Tensor& weight, at::ScalarType acc, int64_t tile_rows)
      : weight_(weight), lowp_(weight.scalar_type() != acc), tile_(std::min(tile_rows, weight.size(0))) {
    if (lowp_) {
      const int64_t rows = tile_;
      wbuf_ = at::empty({rows, weight.size(1)}, weight.options().dtype(acc));
      dwbuf_ = at::empty({rows, weight.size(1)}, weight.options().dtype(acc));
    }
  }
  // ZT [V, c] = W h^T
  void logits(const Tensor& h, Tensor& ZT) {
    if (!lowp_) {
      at::mm_out(ZT, weight_, h.t());
      return;
    }
    for_tiles([&](int64_t v0, int64_t vt, const Tensor& Wt) {
      Tensor out = ZT.narrow(0, v0, vt);
      at::mm_out(out, Wt, h.t());
    });
  }
  // dh = ZT^T W (overwritten), dW (+)= ZT h; dW has the weight's dtype
  void grads(const Tensor& ZT, const Tensor& h, Tensor dh, Tensor& dW, bool accumulate) {
    if (!lowp_) {
      if (accumulate) {
        dW.addmm_(ZT, h);
      } else {
        at::mm_out(dW, ZT, h);
      }
      at::mm_out(dh, ZT.t(), weight_);
      return;
    }
    dh.zero_();
    for_tiles([&](int64_t v0, int64_t vt, const Tensor& Wt) {
      const Tensor Zt = ZT.narrow(0, v0, vt);
      dh.addmm_(Zt.t(), Wt);
      Tensor dWt = dwbuf_.narrow(0, 0, vt);
      Tensor out = dW.narrow(0, v0, vt);
      if (accumulate) {  // upcast, add in the GEMM, round once (2.5x faster than a mixed-dtype add_)
        dWt.copy_(out);
        dWt.addmm_(Zt, h);
      } else {
        at::mm_out(dWt, Zt, h);
      }
      out.copy_(dWt);
    });
  }

 private:
  template <typename F>
  void for_tiles(F&& f) {
    const int64_t V = weight_.size(0);
    for (int64_t v0 = 0; v0 < V; v0 += tile_) {
      const int64_t vt = std::min(tile_, V - v0);
      Tensor Wt = wbuf_.narrow(0, 0, vt);
      Wt.copy_(weight_.narrow(0, v0, vt));
      f(v0, vt, Wt);
    }
  }
  const Tensor& weight_;
  const bool lowp_;
  const int64_t tile_;
  Tensor wbuf_, dwbuf_;
};

template <typename acc_t>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> fwdbwd_typed(const Tensor& hidden, const Tensor& weight,
                                                                const std::optional<Tensor>& bias,
                                                                const Tensor& targets, const Tensor& inv_temp,
                                                                const std::optional<Tensor>& old_logprob,
                                                                const Tensor& advantages,
                                                                const Surrogate& s, bool compute_entropy,
                                                                bool need_grad, int64_t chunk, int64_t tile_rows) {
  const auto acc = c10::CppTypeToScalarType<acc_t>::value;
  const int64_t n = hidden.size(0), D = hidden.size(1), V = weight.size(0);
  const auto fopts = hidden.options().dtype(acc);
  const Tensor h = hidden.detach().contiguous(), W = weight.detach().contiguous();
  const Tensor y = targets.contiguous(), it = inv_temp.to(acc).contiguous();
  const Tensor old = old_logprob.has_value() ? old_logprob->to(acc).contiguous() : Tensor();
  const Tensor adv = advantages.to(acc).contiguous();
  const Tensor b = bias.has_value() ? bias->detach().to(acc).contiguous() : Tensor();
  Tensor logprob = at::empty({n}, fopts);
  Tensor entropy = at::empty({compute_entropy ? n : 0}, fopts);
  using Shape = std::vector<int64_t>;
  Tensor grad_h = at::empty(need_grad ? Shape{n, D} : Shape{0}, fopts);
  Tensor grad_w = at::empty(need_grad ? Shape{V, D} : Shape{0}, weight.options());
  Tensor grad_b = at::zeros({need_grad && b.defined() ? V : 0}, fopts);
  if (n == 0) {
    if (need_grad) grad_w.zero_();
    return {logprob, entropy, grad_h, grad_w, grad_b};
  }
  const int64_t C = std::min(n, chunk);
  const Tensor zbuf = at::empty({C * V}, fopts);
  const Tensor hbuf = h.scalar_type() == acc ? Tensor() : at::empty({C, D}, fopts);
  ChunkGemms gemms(W, acc, tile_rows);
  for (int64_t r0 = 0; r0 < n; r0 += C) {
    const int64_t c = std::min(C, n - r0);
    Tensor hc = h.narrow(0, r0, c);
    if (hbuf.defined()) hc = hbuf.narrow(0, 0, c).copy_(hc);
    Tensor ZT = zbuf.narrow(0, 0, c * V).view({V, c});
    gemms.logits(hc, ZT);
    const ChunkRows<acc_t> rows{it.data_ptr<acc_t>() + r0, y.data_ptr<int64_t>() + r0,
                                old.defined() ? old.data_ptr<acc_t>() + r0 : nullptr, adv.data_ptr<acc_t>() + r0,
                                logprob.data_ptr<acc_t>() + r0,
                                compute_entropy ? entropy.data_ptr<acc_t>() + r0 : nullptr};
    acc_t* zp = ZT.data_ptr<acc_t>();
    const acc_t* bp = b.defined() ? b.data_ptr<acc_t>() : nullptr;
    at::parallel_for(0, (c + kCols - 1) / kCols, 1, [&](int64_t lo, int64_t hi) {
      grpo_rows(zp, c, bp, V, rows, s, need_grad, lo, hi);
    });
    if (!need_grad) continue;
    gemms.grads(ZT, hc, grad_h.narrow(0, r0, c), grad_w, r0 > 0);
    if (b.defined()) grad_b.add_(ZT.sum(1));
  }
  return {logprob, entropy, grad_h, grad_w, grad_b};
}

void check(bool ok, const char* what) { TORCH_CHECK(ok, "prepo_kernels::grpo_loss_fwdbwd: ", what); }

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> grpo_loss_fwdbwd(
    const Tensor& hidden, const Tensor& weight, const std::optional<Tensor>& bias, const Tensor& targets,
    const Tensor& inv_temp, const std::optional<Tensor>& old_logprob, const Tensor& advantages, double scale,
    double eps_low,
    double eps_high, bool compute_entropy, bool need_grad, int64_t chunk_rows, int64_t tile_rows) {
  const auto dt = hidden.scalar_type();
  check(hidden.dim() == 2 && weight.dim() == 2 && hidden.size(1) == weight.size(1), "hidden [n, D], weight [V, D]");
  check(weight.size(0) > 0, "weight must have at least one row");
  check(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf,
        "hidden must be float32 / float64 / bfloat16 / float16");
  check(weight.scalar_type() == dt, "weight dtype must equal hidden's");
  check(!bias.has_value() || (bias->dim() == 1 && bias->size(0) == weight.size(0) && bias->scalar_type() == dt),
        "bias must be [V] of hidden's dtype");
  const int64_t n = hidden.size(0);
  for (const Tensor* t : {&targets, &inv_temp, &advantages})
    check(t->dim() == 1 && t->size(0) == n, "targets, inv_temp, old_logprob and advantages must be [n]");
  check(!old_logprob.has_value() || (old_logprob->dim() == 1 && old_logprob->size(0) == n),
        "targets, inv_temp, old_logprob and advantages must be [n]");
  check(targets.scalar_type() == at::kLong, "targets must be int64");
  check(chunk_rows > 0 && tile_rows > 0, "chunk_rows and tile_rows must be > 0");
  if (n > 0) {
    check(targets.min().item<int64_t>() >= 0 && targets.max().item<int64_t>() < weight.size(0),
          "targets must be in [0, V)");
  }
  const Surrogate s{scale, eps_low, eps_high, !old_logprob.has_value()};
  if (dt == at::kDouble)
    return fwdbwd_typed<double>(hidden, weight, bias, targets, inv_temp, old_logprob, advantages, s,
                                compute_entropy, need_grad, chunk_rows, tile_rows);
  return fwdbwd_typed<float>(hidden, weight, bias, targets, inv_temp, old_logprob, advantages, s, compute_entropy,
                             need_grad, chunk_rows, tile_rows);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(prepo_kernels, m) {
  m.def(
      "grpo_loss_fwdbwd(Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, Tensor inv_temp, "
      "Tensor? old_logprob, Tensor advantages, float scale, float eps_low, float eps_high, bool compute_entropy, "
      "bool need_grad, int chunk_rows, int tile_rows) -> (Tensor logprob, Tensor entropy, Tensor grad_hidden, Tensor grad_weight, "
      "Tensor grad_bias)");
}

TORCH_LIBRARY_IMPL(prepo_kernels, CPU, m) { m.impl("grpo_loss_fwdbwd", &grpo_loss_fwdbwd); }

}  // namespace prepo_kernels
