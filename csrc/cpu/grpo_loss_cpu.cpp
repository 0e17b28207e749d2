// The one-pass GRPO loss's row chunks on CPU (prepo_kernels/backends/grpo_chunks.py: CppChunks):
// prepo_kernels::grpo_chunk_forward and grpo_chunk_backward (schemas in csrc/ops.cpp), called per
// chunk of c rows around the objective's per-token gradient, which Python computes in between.
//
// The chunk's logits are held vocab-major, ZT [V, c], in the caller's buffer (MKL runs W h^T at 256
// rows 1.5x faster than h W^T):
//   forward:  ZT = W h^T (matmul 1, ATen BLAS, all threads), then one OpenMP pass over blocks of 16
//             token columns, vectorized across the tokens of a vocab row: z = (ZT + b) * inv_temp
//             (written back), each token's max, sum e^{z-m} (and sum e^{z-m}(z-m) for the entropy),
//             lse, logprob = z_y - lse, entropy = lse - sum p z.
//   backward: ZT <- dL/dz * inv_temp = (g (1[v=y] - p_v) - e p_v (z_v - lse + H)) * inv_temp in place,
//             from g = dL/dlogprob and e = dL/dentropy; dh = ZT^T W (matmul 2); dW += ZT h, db += row
//             sums of ZT (matmul 3).
// Nothing is recomputed. The GEMM dtype follows what the CPU has:
// - fp32 / fp64 run their GEMMs in their own dtype on the whole vocabulary (ChunkGemms).
// - bf16 on a CPU with native bf16 dot products (AVX512_BF16 / AMX, where oneDNN's bf16 brgemm runs;
//   PREPO_CPU_BF16_BRGEMM=0 turns it off): Bf16ChunkGemms, the logits in fp32 from bf16 operands
//   (brgemm), the backward GEMMs as bf16 matmuls on dz rounded to bf16 (as lle_cpu.cpp, Liger, CCE).
// - bf16 elsewhere, and fp16, run them in fp32 (without native bf16 dot products ATen's bf16 matmul
//   is several times slower than fp32): h is upcast once per call, W one vocab tile of tile_rows rows
//   at a time into a buffer, and each vocab tile of dW is upcast into a tile-sized fp32 buffer,
//   accumulated there by the GEMM and rounded back to the weight's dtype.
// Either way dW accumulates in the weight's dtype with one rounding per row chunk (no [V, D] fp32
// accumulator; Liger's fused linear losses also accumulate grad_weight in the weight's dtype).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>

#include "bf16_brgemm.h"
#include "fast_exp.h"

namespace prepo_kernels {
namespace {

using at::Tensor;

// exp(d) for d <= 0, exactly 0 below the clamp (a -inf logit gives 0, never NaN).
PREPO_ALWAYS_INLINE float clamped_exp(float d) { return d > kExpLowF ? exp_f32(d > kExpLowF ? d : kExpLowF) : 0.0f; }
PREPO_ALWAYS_INLINE double clamped_exp(double d) { return d > -1.0e4 ? std::exp(d) : 0.0; }

// Token columns one call of stats_cols / grad_cols handles: 16 fp32 = one cache line of each vocab row.
constexpr int64_t kCols = 16;
// Vocab rows summed on their own before their sum joins the token's total (see sum_exps).
constexpr int64_t kSumRows = 128;

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


// The per-token inputs and outputs of one chunk, each indexed by the token's column in ZT.
template <typename T>
struct ChunkRows {
  const T* inv_temp;
  const int64_t* target;
  T* logprob;
  T* entropy;  // nullptr: not asked for
  T* lse;
};

// Forward for the token columns [j0, j0 + w), w <= kCols, of the chunk's vocab-major logits ZT [V, c]
// (token j's logit for vocab row v at ZT[v * c + j]): raw logits in, scaled logits out. Two sweeps
// down the vocabulary, each over w contiguous values per row (vectorized across tokens): scale and
// max; sum e^{z-m} and sum e^{z-m}(z-m).
template <typename T>
PREPO_ALWAYS_INLINE void stats_cols(T* __restrict ZT, int64_t c, const T* __restrict b, int64_t V,
                                    const ChunkRows<T>& r, int64_t j0, int64_t w) {
  T sc[kCols], mx[kCols], sum[kCols], tsum[kCols];
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
  for (int64_t k = 0; k < w; ++k) {
    const int64_t j = j0 + k;
    const T log_sum = std::log(sum[k]);
    r.lse[j] = mx[k] + log_sum;
    if (r.entropy != nullptr) r.entropy[j] = log_sum - tsum[k] / sum[k];
    r.logprob[j] = ZT[r.target[j] * c + j] - r.lse[j];
  }
}

// The per-token gradients of one chunk: g = dL/dlogprob, e = dL/dentropy (nullptr: 0), with the
// forward's lse and entropy.
template <typename T>
struct ChunkGrads {
  const T* inv_temp;
  const int64_t* target;
  const T* lse;
  const T* entropy;
  const T* g;
  const T* e;
};

// Backward for the token columns [j0, j0 + w): scaled logits in, dL/dz * inv_temp out (one sweep).
template <typename T>
PREPO_ALWAYS_INLINE void grad_cols(T* __restrict ZT, int64_t c, int64_t V, const ChunkGrads<T>& r, int64_t j0,
                                   int64_t w) {
  T lse[kCols], coef[kCols], ecoef[kCols], shift[kCols];
  for (int64_t k = 0; k < w; ++k) {
    const int64_t j = j0 + k;
    const T sc = r.inv_temp[j];
    const T e = r.e != nullptr ? r.e[j] : T(0);
    lse[k] = r.lse[j];
    coef[k] = -r.g[j] * sc;  // dz = p (coef + ecoef (z - lse + H)) (+ g sc at the target)
    ecoef[k] = -e * sc;
    shift[k] = r.e != nullptr ? r.entropy[j] - lse[k] : T(0);
  }
  for (int64_t v = 0; v < V; ++v) {
    T* __restrict z = ZT + v * c + j0;
#pragma omp simd
    for (int64_t k = 0; k < w; ++k) {
      const T p = clamped_exp(z[k] - lse[k]);
      z[k] = p > 0 ? p * (coef[k] + ecoef[k] * (z[k] + shift[k])) : T(0);
    }
  }
  for (int64_t k = 0; k < w; ++k) ZT[r.target[j0 + k] * c + j0 + k] += r.g[j0 + k] * r.inv_temp[j0 + k];
}

// Column blocks [lo, hi) of kCols tokens; fp32 is cloned per ISA (fast_exp.h).
template <typename T>
PREPO_ALWAYS_INLINE void stats_blocks(T* ZT, int64_t c, const T* b, int64_t V, const ChunkRows<T>& r, int64_t lo,
                                      int64_t hi) {
  for (int64_t blk = lo; blk < hi; ++blk) stats_cols(ZT, c, b, V, r, blk * kCols, std::min(kCols, c - blk * kCols));
}
template <typename T>
PREPO_ALWAYS_INLINE void grad_blocks(T* ZT, int64_t c, int64_t V, const ChunkGrads<T>& r, int64_t lo, int64_t hi) {
  for (int64_t blk = lo; blk < hi; ++blk) grad_cols(ZT, c, V, r, blk * kCols, std::min(kCols, c - blk * kCols));
}

PREPO_CLONES
void stats_blocks_f32(float* ZT, int64_t c, const float* b, int64_t V, const ChunkRows<float>& r, int64_t lo,
                      int64_t hi) {
  stats_blocks(ZT, c, b, V, r, lo, hi);
}
PREPO_CLONES
void grad_blocks_f32(float* ZT, int64_t c, int64_t V, const ChunkGrads<float>& r, int64_t lo, int64_t hi) {
  grad_blocks(ZT, c, V, r, lo, hi);
}
inline void stats_rows(float* ZT, int64_t c, const float* b, int64_t V, const ChunkRows<float>& r, int64_t lo,
                       int64_t hi) {
  stats_blocks_f32(ZT, c, b, V, r, lo, hi);
}
inline void stats_rows(double* ZT, int64_t c, const double* b, int64_t V, const ChunkRows<double>& r, int64_t lo,
                       int64_t hi) {
  stats_blocks(ZT, c, b, V, r, lo, hi);
}
inline void grad_rows(float* ZT, int64_t c, int64_t V, const ChunkGrads<float>& r, int64_t lo, int64_t hi) {
  grad_blocks_f32(ZT, c, V, r, lo, hi);
}
inline void grad_rows(double* ZT, int64_t c, int64_t V, const ChunkGrads<double>& r, int64_t lo, int64_t hi) {
  grad_blocks(ZT, c, V, r, lo, hi);
}

// The GEMMs of one chunk in the accumulation dtype. For a weight already in that dtype they run on
// the whole vocabulary and dW accumulates in place; otherwise W is upcast and dW computed one
// tile of tile_rows vocab rows at a time, each tile added to the low-precision dW (see the header).
class ChunkGemms {
 public:
  ChunkGemms(const Tensor& weight, at::ScalarType acc, int64_t tile_rows)
      : weight_(weight), acc_(acc), lowp_(weight.scalar_type() != acc), tile_(std::min(tile_rows, weight.size(0))) {
    if (lowp_) {
      const int64_t rows = tile_;
      wbuf_ = at::empty({rows, weight.size(1)}, weight.options().dtype(acc));
      dwbuf_ = at::empty({rows, weight.size(1)}, weight.options().dtype(acc));
    }
  }
  // ZT [V, c] = W h^T
  void logits(const Tensor& hidden, Tensor& ZT) {
    const Tensor h = acc_rows(hidden);
    if (!lowp_) {
      at::mm_out(ZT, weight_, h.t());
      return;
    }
    for_tiles([&](int64_t v0, int64_t vt, const Tensor& Wt) {
      Tensor out = ZT.narrow(0, v0, vt);
      at::mm_out(out, Wt, h.t());
    });
  }
  // dh = ZT^T W (overwritten), dW += ZT h; dW has the weight's dtype
  void grads(const Tensor& ZT, const Tensor& hidden, Tensor dh, Tensor& dW) {
    const Tensor h = acc_rows(hidden);
    if (!lowp_) {
      dW.addmm_(ZT, h);
      at::mm_out(dh, ZT.t(), weight_);
      return;
    }
    dh.zero_();
    for_tiles([&](int64_t v0, int64_t vt, const Tensor& Wt) {
      const Tensor Zt = ZT.narrow(0, v0, vt);
      dh.addmm_(Zt.t(), Wt);
      Tensor dWt = dwbuf_.narrow(0, 0, vt);
      Tensor out = dW.narrow(0, v0, vt);
      dWt.copy_(out);  // upcast, add in the GEMM, round once (2.5x faster than a mixed-dtype add_)
      dWt.addmm_(Zt, h);
      out.copy_(dWt);
    });
  }

 private:
  Tensor acc_rows(const Tensor& hidden) const { return hidden.detach().to(acc_).contiguous(); }
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
  const Tensor weight_;
  const at::ScalarType acc_;
  const bool lowp_;
  const int64_t tile_;
  Tensor wbuf_, dwbuf_;
};

#if defined(PREPO_HAVE_BRGEMM)
// The GEMMs of one chunk for a bf16 weight on a CPU that runs oneDNN's bf16 brgemm (see the header).
// The logits: one brgemm per block of kBlockRows vocab rows (threads split the blocks) against h^T
// packed once per chunk, fp32 out. The backward: dz rounded to bf16 once, then oneDNN's bf16 matmuls;
// dh leaves rounded to bf16 (the hidden's own precision: each row's sum over the vocabulary is done
// inside one GEMM), dW += dz h rounded to bf16 once per chunk.
class Bf16ChunkGemms {
 public:
  explicit Bf16ChunkGemms(const Tensor& weight) : weight_(weight) {}
  void logits(const Tensor& hidden, Tensor& ZT) const {
    using namespace brgemm;
    const Tensor h = hidden.detach().contiguous();
    const int64_t c = h.size(0), D = h.size(1), V = weight_.size(0);
    const Tensor hp = at::empty({packed_size(D, c)}, h.options());
    pack_vnni(h.data_ptr<BFloat16>(), D, c, 1, D, hp.data_ptr<BFloat16>());  // B = h^T [D, c]
    const BFloat16* W = weight_.data_ptr<BFloat16>();
    const BFloat16* B = hp.data_ptr<BFloat16>();
    float* Z = ZT.data_ptr<float>();
    at::parallel_for(0, (V + kBlockRows - 1) / kBlockRows, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t v0 = lo * kBlockRows; v0 < std::min(V, hi * kBlockRows); v0 += kBlockRows)
        brgemm_bf16(std::min(kBlockRows, V - v0), c, D, W + v0 * D, D, B, Z + v0 * c, c, false);
      at::native::cpublas::brgemm_release(true);
    });
  }
  void grads(const Tensor& ZT, const Tensor& hidden, Tensor dh, Tensor& dW) const {
    const Tensor dz = ZT.to(at::kBFloat16);
    dh.copy_(at::mm(dz.t(), weight_));
    dW.addmm_(dz, hidden.detach().contiguous());
  }

 private:
  const Tensor weight_;
};
#endif

// Calls f(gemms) with the chunk GEMMs this weight and CPU take (see the header).
template <typename F>
void with_gemms(const Tensor& weight, at::ScalarType acc, int64_t tile_rows, F&& f) {
  const Tensor w = weight.detach().contiguous();
#if defined(PREPO_HAVE_BRGEMM)
  if (w.scalar_type() == at::kBFloat16 && w.size(1) % 2 == 0 && brgemm::bf16_brgemm_usable()) {
    f(Bf16ChunkGemms(w));
    return;
  }
#endif
  f(ChunkGemms(w, acc, tile_rows));
}

void check(bool ok, const char* what) { TORCH_CHECK(ok, "prepo_kernels::grpo_chunk_*: ", what); }

at::ScalarType checked_acc(const Tensor& hidden, const Tensor& weight, const Tensor& targets, const Tensor& inv_temp) {
  const auto dt = hidden.scalar_type();
  check(hidden.dim() == 2 && weight.dim() == 2 && hidden.size(1) == weight.size(1), "hidden [n, D], weight [V, D]");
  check(weight.size(0) > 0, "weight must have at least one row");
  check(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf,
        "hidden must be float32 / float64 / bfloat16 / float16");
  check(weight.scalar_type() == dt, "weight dtype must equal hidden's");
  const auto acc = dt == at::kDouble ? at::kDouble : at::kFloat;
  check(targets.dim() == 1 && targets.size(0) == hidden.size(0) && targets.scalar_type() == at::kLong,
        "targets must be int64 [n]");
  check(inv_temp.dim() == 1 && inv_temp.size(0) == hidden.size(0) && inv_temp.scalar_type() == acc,
        "inv_temp must be [n] in the accumulation dtype");
  return acc;
}

std::tuple<Tensor, Tensor, Tensor> grpo_chunk_forward(const Tensor& hidden, const Tensor& weight,
                                                      const std::optional<Tensor>& bias, const Tensor& targets,
                                                      const Tensor& inv_temp, bool compute_entropy, int64_t tile_rows,
                                                      Tensor& zbuf) {
  const auto acc = checked_acc(hidden, weight, targets, inv_temp);
  const int64_t c = hidden.size(0), V = weight.size(0);
  check(zbuf.scalar_type() == acc && zbuf.is_contiguous() && zbuf.numel() >= c * V, "zbuf must hold [V, n] acc");
  check(!bias.has_value() || (bias->dim() == 1 && bias->size(0) == V), "bias must be [V]");
  const auto fopts = hidden.options().dtype(acc);
  Tensor logprob = at::empty({c}, fopts), lse = at::empty({c}, fopts);
  Tensor entropy = at::empty({compute_entropy ? c : 0}, fopts);
  if (c == 0) return {logprob, entropy, lse};
  Tensor ZT = zbuf.narrow(0, 0, c * V).view({V, c});
  with_gemms(weight, acc, tile_rows, [&](auto&& gemms) { gemms.logits(hidden, ZT); });
  const Tensor b = bias.has_value() ? bias->detach().to(acc).contiguous() : Tensor();
  const Tensor y = targets.contiguous(), it = inv_temp.contiguous();
  AT_DISPATCH_FLOATING_TYPES(acc == at::kDouble ? at::kDouble : at::kFloat, "grpo_chunk_forward", [&] {
    const ChunkRows<scalar_t> rows{it.data_ptr<scalar_t>(), y.data_ptr<int64_t>(), logprob.data_ptr<scalar_t>(),
                                   compute_entropy ? entropy.data_ptr<scalar_t>() : nullptr, lse.data_ptr<scalar_t>()};
    scalar_t* zp = ZT.data_ptr<scalar_t>();
    const scalar_t* bp = b.defined() ? b.data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, (c + kCols - 1) / kCols, 1, [&](int64_t lo, int64_t hi) { stats_rows(zp, c, bp, V, rows, lo, hi); });
  });
  return {logprob, entropy, lse};
}

void grpo_chunk_backward(Tensor& zbuf, const Tensor& hidden, const Tensor& weight, const Tensor& targets,
                         const Tensor& inv_temp, const Tensor& lse, const Tensor& entropy, const Tensor& grad_logprob,
                         const std::optional<Tensor>& grad_entropy, int64_t tile_rows, Tensor& grad_hidden,
                         Tensor& grad_weight, Tensor& grad_bias) {
  const auto acc = checked_acc(hidden, weight, targets, inv_temp);
  const int64_t c = hidden.size(0), V = weight.size(0), D = hidden.size(1);
  check(zbuf.scalar_type() == acc && zbuf.numel() >= c * V, "zbuf must hold the forward's [V, n] logits");
  check(grad_hidden.scalar_type() == acc && grad_hidden.is_contiguous() && grad_hidden.size(0) == c &&
            grad_hidden.size(1) == D, "grad_hidden must be [n, D] contiguous in the accumulation dtype");
  check(grad_weight.sizes() == weight.sizes() && grad_weight.scalar_type() == weight.scalar_type() &&
            grad_weight.is_contiguous(), "grad_weight must be [V, D] contiguous in the weight's dtype");
  check(grad_bias.numel() == 0 || (grad_bias.numel() == V && grad_bias.scalar_type() == acc), "grad_bias: [V] or [0]");
  const bool has_e = grad_entropy.has_value();
  check(!has_e || entropy.numel() == c, "a gradient of the entropy needs the forward's entropy");
  if (c == 0) return;
  Tensor ZT = zbuf.narrow(0, 0, c * V).view({V, c});
  const Tensor y = targets.contiguous(), it = inv_temp.contiguous(), l = lse.to(acc).contiguous();
  const Tensor g = grad_logprob.to(acc).contiguous(), e = has_e ? grad_entropy->to(acc).contiguous() : Tensor();
  const Tensor H = has_e ? entropy.to(acc).contiguous() : Tensor();
  AT_DISPATCH_FLOATING_TYPES(acc == at::kDouble ? at::kDouble : at::kFloat, "grpo_chunk_backward", [&] {
    const ChunkGrads<scalar_t> rows{it.data_ptr<scalar_t>(), y.data_ptr<int64_t>(), l.data_ptr<scalar_t>(),
                                    has_e ? H.data_ptr<scalar_t>() : nullptr, g.data_ptr<scalar_t>(),
                                    has_e ? e.data_ptr<scalar_t>() : nullptr};
    scalar_t* zp = ZT.data_ptr<scalar_t>();
    at::parallel_for(0, (c + kCols - 1) / kCols, 1, [&](int64_t lo, int64_t hi) { grad_rows(zp, c, V, rows, lo, hi); });
  });
  with_gemms(weight, acc, tile_rows, [&](auto&& gemms) { gemms.grads(ZT, hidden, grad_hidden, grad_weight); });
  if (grad_bias.numel()) grad_bias.add_(ZT.sum(1));
}

}  // namespace

TORCH_LIBRARY_IMPL(prepo_kernels, CPU, m) {
  m.impl("grpo_chunk_forward", &grpo_chunk_forward);
  m.impl("grpo_chunk_backward", &grpo_chunk_backward);
}

}  // namespace prepo_kernels
