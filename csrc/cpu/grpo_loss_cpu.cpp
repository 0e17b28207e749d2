// prepo_kernels::grpo_loss_fwdbwd on CPU: the fused linear GRPO loss's forward and gradients in one
// call, at three matmuls of [n, D] x [D, V] (contract and formulas: prepo_kernels/grpo_backends.py).
//
// The rows run in chunks of chunk_rows (the caller bounds a chunk's logits). For each chunk of c rows:
//   1. Z [c, V] = h_chunk W^T                               (matmul 1, ATen BLAS, all threads)
//   2. one OpenMP pass over the chunk's rows, each row in cache: z = (Z + b) * inv_temp, its max,
//      sum e^{z-m} (and sum e^{z-m}(z-m) for the entropy), lse, logprob = z_y - lse, the surrogate's
//      gradient g = dL/dlogprob from the row's own ratio / advantage / clip range, and
//      Z <- dL/dz * inv_temp = g (1[v=y] - p_v) * inv_temp in place;
//   3. dh_chunk = Z W                                       (matmul 2)
//   4. dW += Z^T h_chunk, db += column sums of Z            (matmul 3)
// Nothing is recomputed. fp32 / fp64 run their GEMMs in their own dtype on the whole vocabulary.
// bf16 / fp16 run them in fp32 (on CPUs without native bf16 GEMMs, ATen's bf16 matmul is several
// times slower than fp32): h_chunk is upcast once per chunk, W one vocab tile of tile_rows rows at a
// time into a buffer (the caller sizes it: prepo_kernels/grpo_backends.py), and each vocab tile's share of dW is computed in fp32 into a tile-sized buffer and added
// to grad_weight in the weight's dtype (fp32 add, one rounding per row chunk). No [V, D] fp32
// accumulator: the memory of linear_logprob_entropy's backward, which rounds each dW tile once
// because it runs vocab tiles outermost; here the row chunks are outermost (a row's full logits
// give its loss gradient), so a tile is revisited once per chunk (Liger's fused linear losses also
// accumulate grad_weight in the weight's dtype).
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

// The row's pass (step 2 above): z [V] raw logits in, dL/dz * inv_temp out (when grad). Writes the
// row's logprob and, when entropy != nullptr, its entropy.
template <typename T>
PREPO_ALWAYS_INLINE void grpo_row(T* __restrict z, const T* __restrict b, int64_t V, T sc, int64_t y, T old, T adv,
                                  const Surrogate& s, bool grad, T* logprob, T* entropy) {
  T mx = -std::numeric_limits<T>::infinity();
  if (b != nullptr) {
#pragma omp simd reduction(max : mx)
    for (int64_t i = 0; i < V; ++i) {
      z[i] = (z[i] + b[i]) * sc;
      mx = z[i] > mx ? z[i] : mx;
    }
  } else {
#pragma omp simd reduction(max : mx)
    for (int64_t i = 0; i < V; ++i) {
      z[i] *= sc;
      mx = z[i] > mx ? z[i] : mx;
    }
  }
  T sum = 0, tsum = 0;
  if (entropy != nullptr) {
#pragma omp simd reduction(+ : sum, tsum)
    for (int64_t i = 0; i < V; ++i) {
      const T d = z[i] - mx;
      const T e = clamped_exp(d);
      sum += e;
      tsum += e > 0 ? e * d : T(0);
    }
    *entropy = std::log(sum) - tsum / sum;
  } else {
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < V; ++i) sum += clamped_exp(z[i] - mx);
  }
  const T lse = mx + std::log(sum);
  *logprob = z[y] - lse;
  if (!grad) return;
  const T g = s.grad(*logprob, old, adv);
  if (g == 0) {  // clipped: the row contributes nothing (its zeros still go through the GEMMs)
    std::fill(z, z + V, T(0));
    return;
  }
  const T c = -g * sc;
#pragma omp simd
  for (int64_t i = 0; i < V; ++i) z[i] = c * clamped_exp(z[i] - lse);
  z[y] += g * sc;
}

// Step 2 for rows [r0, r0 + c) of the chunk Z [c, V]; fp32 rows are cloned per ISA (fast_exp.h).
PREPO_CLONES
void grpo_rows_f32(float* Z, const float* b, int64_t V, const float* it, const int64_t* y, const float* old,
                   const float* adv, const Surrogate& s, bool grad, float* lp, float* ent, int64_t lo, int64_t hi) {
  for (int64_t i = lo; i < hi; ++i)
    grpo_row(Z + i * V, b, V, it[i], y[i], old != nullptr ? old[i] : 0.0f, adv[i], s, grad, lp + i,
             ent != nullptr ? ent + i : nullptr);
}

void grpo_rows_f64(double* Z, const double* b, int64_t V, const double* it, const int64_t* y, const double* old,
                   const double* adv, const Surrogate& s, bool grad, double* lp, double* ent, int64_t lo,
                   int64_t hi) {
  for (int64_t i = lo; i < hi; ++i)
    grpo_row(Z + i * V, b, V, it[i], y[i], old != nullptr ? old[i] : 0.0, adv[i], s, grad, lp + i,
             ent != nullptr ? ent + i : nullptr);
}

inline void grpo_rows(float* Z, const float* b, int64_t V, const float* it, const int64_t* y, const float* old,
                      const float* adv, const Surrogate& s, bool grad, float* lp, float* ent, int64_t lo,
                      int64_t hi) {
  grpo_rows_f32(Z, b, V, it, y, old, adv, s, grad, lp, ent, lo, hi);
}
inline void grpo_rows(double* Z, const double* b, int64_t V, const double* it, const int64_t* y, const double* old,
                      const double* adv, const Surrogate& s, bool grad, double* lp, double* ent, int64_t lo,
                      int64_t hi) {
  grpo_rows_f64(Z, b, V, it, y, old, adv, s, grad, lp, ent, lo, hi);
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
  // Z [c, V] = h W^T
  void logits(const Tensor& h, Tensor& Z) {
    if (!lowp_) {
      at::mm_out(Z, h, weight_.t());
      return;
    }
    for_tiles([&](int64_t v0, int64_t vt, const Tensor& Wt) {
      Tensor out = Z.narrow(1, v0, vt);
      at::mm_out(out, h, Wt.t());
    });
  }
  // dh = Z W (overwritten), dW (+)= Z^T h; dW has the weight's dtype
  void grads(const Tensor& Z, const Tensor& h, Tensor dh, Tensor& dW, bool accumulate) {
    if (!lowp_) {
      if (accumulate) {
        dW.addmm_(Z.t(), h);
      } else {
        at::mm_out(dW, Z.t(), h);
      }
      at::mm_out(dh, Z, weight_);
      return;
    }
    dh.zero_();
    for_tiles([&](int64_t v0, int64_t vt, const Tensor& Wt) {
      const Tensor Zt = Z.narrow(1, v0, vt);
      dh.addmm_(Zt, Wt);
      Tensor dWt = dwbuf_.narrow(0, 0, vt);
      at::mm_out(dWt, Zt.t(), h);
      Tensor out = dW.narrow(0, v0, vt);
      if (accumulate) {
        out.add_(dWt);  // computed in fp32, rounded once to the weight's dtype
      } else {
        out.copy_(dWt);
      }
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
    Tensor Z = zbuf.narrow(0, 0, c * V).view({c, V});
    gemms.logits(hc, Z);
    acc_t* zp = Z.data_ptr<acc_t>();
    const acc_t* bp = b.defined() ? b.data_ptr<acc_t>() : nullptr;
    acc_t* lp = logprob.data_ptr<acc_t>() + r0;
    acc_t* ent = compute_entropy ? entropy.data_ptr<acc_t>() + r0 : nullptr;
    const acc_t* itp = it.data_ptr<acc_t>() + r0;
    const acc_t* oldp = old.defined() ? old.data_ptr<acc_t>() + r0 : nullptr;
    const acc_t* advp = adv.data_ptr<acc_t>() + r0;
    const int64_t* yp = y.data_ptr<int64_t>() + r0;
    at::parallel_for(0, c, 1, [&](int64_t lo, int64_t hi) {
      grpo_rows(zp, bp, V, itp, yp, oldp, advp, s, need_grad, lp, ent, lo, hi);
    });
    if (!need_grad) continue;
    gemms.grads(Z, hc, grad_h.narrow(0, r0, c), grad_w, r0 > 0);
    if (b.defined()) grad_b.add_(Z.sum(0));
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
