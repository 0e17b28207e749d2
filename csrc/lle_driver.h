// The one host-side driver of prepo_kernels::lle_forward / lle_backward (schemas in csrc/ops.cpp,
// semantics in prepo_kernels/backends/base.py), shared by the CPU (csrc/cpu) and CUDA (csrc/cuda)
// kernels: entry checks, dtype dispatch, operand preparation, output allocation, the tile loop and the
// merge of the per-row statistics. The [n, V] logits are never materialized: the vocabulary is cut
// into tiles (outer loop), the rows into blocks (inner loop), and for each (vocab tile, row block) a
// tile-GEMM engine writes the logit tile Z = h_block W_tile^T into a reused buffer.
//
// A device is a struct of static members:
//   kType                                 c10::DeviceType
//   tiling(n, D, V, acc_bytes) -> Tiling  tile sizes and the number of partitions
//   stats_dtype(acc)                      dtype of the per-partition row statistics
//   parallel(P, f)                        runs f(p) for every partition p (its threading / launch)
//   with_engine<acc_t>(o, backward, t, run)   calls run(make_engine); make_engine() builds one
//                                         partition's tile-GEMM engine (see BlasTiles)
// and the two hooks, which see one logit tile Z [nt, vt] of rows r0.. and vocab v0..:
//   tile_stats<acc_t>(o, v0, r0, Z, stats_p, zy)   merge the tile's max / sum e^{z-m} /
//       sum e^{z-m}(z-m) into the partition's running statistics stats_p [3, n] (m, s, t) and
//       record z_y in zy [n] for the rows whose target lies in the tile;
//   tile_grad<acc_t>(o, v0, r0, Z, grad_bias)      turn Z into dz * inv_temp in place and add its
//       column sums to grad_bias (when there is a bias).
// Partition p owns the vocab tiles [p * ntiles / P, (p + 1) * ntiles / P): its statistics, its rows
// of grad_weight / grad_bias and a private grad_hidden, merged in partition order, so the results are
// a fixed function of P (run-to-run deterministic).
#pragma once

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>

namespace prepo_kernels {

using at::Tensor;

// The op's contract: hidden [n, D], weight [V, D] and bias [V] of one float dtype, targets [n] int64
// in [0, V), inv_temp [n], all on one device of `device_type`. Shapes, dtypes and devices are checked
// here; the target values are not: the public API checks them once per call (prepo_kernels/
// validation.py), and a device sync per op to check them again would cost more than the check is
// worth. The kernels never index with a target: an id outside [0, V) matches no column (z_y = 0).
inline void check_inputs(const Tensor& hidden, const Tensor& weight, const std::optional<Tensor>& bias,
                         const Tensor& targets, const Tensor& inv_temp, c10::DeviceType device_type) {
  TORCH_CHECK(hidden.device().type() == device_type, "prepo_kernels ", device_type,
              " kernel: hidden must be on ", device_type, ", got ", hidden.device());
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2, "hidden must be [n, D] and weight [V, D], got ",
              hidden.sizes(), " and ", weight.sizes());
  TORCH_CHECK(hidden.size(1) == weight.size(1), "hidden [n, D] and weight [V, D] disagree on D: ",
              hidden.sizes(), " vs ", weight.sizes());
  TORCH_CHECK(weight.size(0) > 0, "weight must have at least one row (V >= 1)");
  TORCH_CHECK(hidden.size(0) <= std::numeric_limits<int32_t>::max(), "too many rows: ", hidden.size(0),
              " (at most 2^31 - 1)");
  const auto dt = hidden.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf,
              "hidden must be float32/float64/bfloat16/float16, got ", dt);
  TORCH_CHECK(weight.scalar_type() == dt, "weight dtype ", weight.scalar_type(), " != hidden dtype ", dt);
  TORCH_CHECK(weight.device() == hidden.device(), "weight must be on the same device as hidden");
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), "bias must be [V], got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == dt, "bias dtype ", bias->scalar_type(), " != hidden dtype ", dt);
    TORCH_CHECK(bias->device() == hidden.device(), "bias must be on the same device as hidden");
  }
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == hidden.size(0), "targets must be [n], got ",
              targets.sizes());
  TORCH_CHECK(targets.scalar_type() == at::kLong, "targets must be int64, got ", targets.scalar_type());
  TORCH_CHECK(inv_temp.dim() == 1 && inv_temp.size(0) == hidden.size(0), "inv_temp must be [n], got ",
              inv_temp.sizes());
  TORCH_CHECK(targets.device() == hidden.device() && inv_temp.device() == hidden.device(),
              "targets and inv_temp must be on the same device as hidden");
}

// fp64 inputs accumulate in fp64, every other float dtype in fp32.
inline at::ScalarType acc_type(const Tensor& hidden) {
  return hidden.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// A contiguous [rows, cols] view at the start of a flat buffer (tiles reuse one allocation).
inline Tensor tile_view(const Tensor& flat, int64_t rows, int64_t cols) {
  return flat.narrow(0, 0, rows * cols).view({rows, cols});
}

// The operands of one op call as one record, detached (CPU worker threads do not inherit the
// dispatcher's thread-local "below autograd" state, so their ATen calls must not see tensors that
// require grad) and contiguous, the small ones in the accumulation dtype. g, e, H, lse: backward
// only; e and H undefined without grad_entropy.
struct Operands {
  Tensor hidden, weight, targets, inv_temp, bias;  // bias undefined when absent
  Tensor g, e, H, lse;
  int64_t n, D, V;
};

inline Operands prepare_operands(const Tensor& hidden, const Tensor& weight, const std::optional<Tensor>& bias,
                                 const Tensor& targets, const Tensor& inv_temp) {
  const auto acc = acc_type(hidden);
  Operands o;
  o.hidden = hidden.detach().contiguous();
  o.weight = weight.detach().contiguous();
  o.targets = targets.contiguous();
  o.inv_temp = inv_temp.detach().to(acc).contiguous();
  if (bias.has_value()) o.bias = bias->detach().to(acc).contiguous();
  o.n = hidden.size(0);
  o.D = hidden.size(1);
  o.V = weight.size(0);
  return o;
}

inline void prepare_backward(Operands& o, const Tensor& grad_logprob, const std::optional<Tensor>& grad_entropy,
                             const Tensor& lse, const Tensor& entropy) {
  const auto acc = acc_type(o.hidden);
  TORCH_CHECK(grad_logprob.dim() == 1 && grad_logprob.size(0) == o.n, "grad_logprob must be [n], got ",
              grad_logprob.sizes());
  TORCH_CHECK(lse.dim() == 1 && lse.size(0) == o.n, "lse must be [n], got ", lse.sizes());
  TORCH_CHECK(grad_logprob.device() == o.hidden.device() && lse.device() == o.hidden.device(),
              "grad_logprob and lse must be on the same device as hidden");
  o.g = grad_logprob.detach().to(acc).contiguous();
  o.lse = lse.detach().to(acc).contiguous();
  if (grad_entropy.has_value() && grad_entropy->defined()) {
    TORCH_CHECK(grad_entropy->dim() == 1 && grad_entropy->size(0) == o.n, "grad_entropy must be [n], got ",
                grad_entropy->sizes());
    TORCH_CHECK(entropy.dim() == 1 && entropy.size(0) == o.n,
                "entropy must be [n] when grad_entropy is given (forward ran with compute_entropy=False?)");
    TORCH_CHECK(grad_entropy->device() == o.hidden.device() && entropy.device() == o.hidden.device(),
                "grad_entropy and entropy must be on the same device as hidden");
    o.e = grad_entropy->detach().to(acc).contiguous();
    o.H = entropy.detach().to(acc).contiguous();
  }
}

// Vt vocab rows per tile, Nt rows per block, P partitions of the ntiles tiles; backward runs the rows
// in chunks of R (a multiple of Nt, or n) so that the P - 1 private grad_hidden [R, D] stay bounded.
struct Tiling {
  int64_t Vt, ntiles, P, Nt, R;
};

// A tile-GEMM engine on ATen matmuls in the accumulation dtype (MKL / OpenBLAS, cuBLAS); bf16 / fp16
// tiles are upcast to fp32 first. Engines have this interface:
//   set_tile(v0, vt)                        load (upcast / pack) the weight tile W[v0 : v0 + vt]
//   logits(r0, nt, Z)                       Z [nt, vt] = h[r0 : r0 + nt] W_tile^T (acc dtype)
//   grads(r0, nt, Z, dh, dWt, accumulate)   dh += dz W_tile, dWt (+)= dz^T h[r0 : r0 + nt], where Z
//                                           holds dz * inv_temp of the row block of the last logits()
template <typename acc_t>
class BlasTiles {
 public:
  BlasTiles(const Tensor& hidden, const Tensor& weight, const Tiling& t)
      : hidden_(hidden), weight_(weight), lowp_(hidden.scalar_type() != c10::CppTypeToScalarType<acc_t>::value) {
    if (lowp_) {
      const auto fopts = hidden.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
      wbuf_ = at::empty({t.Vt * hidden.size(1)}, fopts);
      hbuf_ = at::empty({t.Nt * hidden.size(1)}, fopts);
    }
  }
  void set_tile(int64_t v0, int64_t vt) {
    Wt_ = weight_.narrow(0, v0, vt);
    if (lowp_) Wt_ = tile_view(wbuf_, vt, weight_.size(1)).copy_(Wt_);
  }
  void logits(int64_t r0, int64_t nt, Tensor& Z) {
    hb_ = hidden_.narrow(0, r0, nt);
    if (lowp_) hb_ = tile_view(hbuf_, nt, hidden_.size(1)).copy_(hb_);
    at::mm_out(Z, hb_, Wt_.t());
  }
  void grads(int64_t /*r0*/, int64_t /*nt*/, const Tensor& Z, Tensor dh, Tensor dWt, bool accumulate) {
    dh.addmm_(Z, Wt_);
    if (accumulate) {
      dWt.addmm_(Z.t(), hb_);
    } else {
      at::mm_out(dWt, Z.t(), hb_);
    }
  }

 private:
  const Tensor& hidden_;
  const Tensor& weight_;
  const bool lowp_;
  Tensor wbuf_, hbuf_, Wt_, hb_;
};

// The tile loop of partition p over rows [r_lo, r_hi): on_tile(v0, r0, Z) for every logit tile,
// then tile_done(v0, vt) once a vocab tile has seen all its row blocks.
template <typename Engine, typename OnTile, typename TileDone>
void for_each_tile(const Tiling& t, int64_t V, int64_t p, int64_t r_lo, int64_t r_hi, Engine& engine,
                   const Tensor& zbuf, OnTile&& on_tile, TileDone&& tile_done) {
  for (int64_t tile = p * t.ntiles / t.P; tile < (p + 1) * t.ntiles / t.P; ++tile) {
    const int64_t v0 = tile * t.Vt, vt = std::min(t.Vt, V - v0);
    engine.set_tile(v0, vt);
    for (int64_t r0 = r_lo; r0 < r_hi; r0 += t.Nt) {
      const int64_t nt = std::min(t.Nt, r_hi - r0);
      Tensor Z = tile_view(zbuf, nt, vt);
      engine.logits(r0, nt, Z);
      on_tile(v0, r0, Z);
    }
    tile_done(v0, vt);
  }
}

// lse, logprob, entropy from the partitions' statistics stats [P, 3, n] (m, s, t relative to m) and
// z_y: the partitions are merged at their common max M.
inline void finalize_stats(const Tensor& stats, const Tensor& zy, Tensor& logprob, Tensor& entropy, Tensor& lse) {
  const Tensor m = stats.select(1, 0), s = stats.select(1, 1), t = stats.select(1, 2);
  const Tensor M = m.amax(0);
  const Tensor live = s.gt(0);  // a partition whose entries are all -inf contributes nothing
  const Tensor d = at::where(live, m - M, at::zeros_like(m));
  const Tensor a = at::where(live, at::exp(d), at::zeros_like(m));
  const Tensor S = (a * s).sum(0);
  const Tensor T = (a * (t + d * s)).sum(0);
  const Tensor logs = at::log(S);
  const Tensor l = M + logs;
  lse.copy_(l);
  logprob.copy_(zy - l);
  if (entropy.numel() > 0) entropy.copy_(logs - T / S);
}

template <typename Device, typename acc_t>
std::tuple<Tensor, Tensor, Tensor> forward_typed(const Operands& o, bool compute_entropy) {
  const int64_t n = o.n;
  const auto fopts = o.hidden.options().dtype(acc_type(o.hidden));
  Tensor logprob = at::empty({n}, fopts);
  Tensor lse = at::empty({n}, fopts);
  Tensor entropy = at::empty({compute_entropy ? n : 0}, fopts);
  if (n == 0) return {logprob, entropy, lse};

  const Tiling t = Device::tiling(n, o.D, o.V, sizeof(acc_t));
  const auto sopts = o.hidden.options().dtype(Device::stats_dtype(acc_type(o.hidden)));
  Tensor stats = at::zeros({t.P, 3, n}, sopts);
  stats.select(1, 0).fill_(-std::numeric_limits<double>::infinity());
  Tensor zy = at::zeros({n}, sopts);
  Device::template with_engine<acc_t>(o, false, t, [&](auto make_engine) {
    Device::parallel(t.P, [&](int64_t p) {
      auto engine = make_engine();
      const Tensor zbuf = at::empty({t.Nt * t.Vt}, fopts);
      const Tensor stats_p = stats[p];
      for_each_tile(
          t, o.V, p, 0, n, engine, zbuf,
          [&](int64_t v0, int64_t r0, const Tensor& Z) { Device::template tile_stats<acc_t>(o, v0, r0, Z, stats_p, zy); },
          [](int64_t, int64_t) {});
    });
  });
  finalize_stats(stats, zy, logprob, entropy, lse);
  return {logprob, entropy, lse};
}

template <typename Device, typename acc_t>
std::tuple<Tensor, Tensor, Tensor> backward_typed(const Operands& o) {
  const auto acc = acc_type(o.hidden);
  const int64_t n = o.n, D = o.D, V = o.V;
  const auto fopts = o.hidden.options().dtype(acc);
  Tensor grad_hidden = at::zeros({n, D}, fopts);
  Tensor grad_weight = at::empty({V, D}, o.weight.options());  // the weight's dtype (ops.cpp)
  Tensor grad_bias = o.bias.defined() ? at::zeros({V}, fopts) : at::empty({0}, fopts);
  if (n == 0) {
    grad_weight.zero_();
    return {grad_hidden, grad_weight, grad_bias};
  }

  const Tiling t = Device::tiling(n, D, V, sizeof(acc_t));
  // dW accumulates in acc_t. In place when the weight is acc_t. For bf16 / fp16 weights each vocab
  // tile accumulates in a tile-sized buffer and is written once, rounded, when its row blocks are
  // done: no [V, D] fp32 copy. Only when the rows run in several chunks (t.R < n, bounding the
  // private grad_hidden) is a tile revisited; then a full acc_t dW is kept and rounded at the end.
  const bool in_place = o.weight.scalar_type() == acc, per_tile = !in_place && t.R >= n;
  const Tensor dw_full = in_place ? grad_weight : (per_tile ? Tensor() : at::empty({V, D}, fopts));
  const Tensor dh_private = t.P > 1 ? at::empty({t.P - 1, t.R, D}, fopts) : Tensor();
  Device::template with_engine<acc_t>(o, true, t, [&](auto make_engine) {
    for (int64_t c0 = 0; c0 < n; c0 += t.R) {
      const int64_t rc = std::min(t.R, n - c0);
      Device::parallel(t.P, [&](int64_t p) {
        auto engine = make_engine();
        const Tensor zbuf = at::empty({t.Nt * t.Vt}, fopts);
        const Tensor dw_tile = per_tile ? at::empty({t.Vt * D}, fopts) : Tensor();
        Tensor dh = p == 0 ? grad_hidden.narrow(0, c0, rc) : dh_private[p - 1].narrow(0, 0, rc);
        if (p > 0) dh.zero_();
        for_each_tile(
            t, V, p, c0, c0 + rc, engine, zbuf,
            [&](int64_t v0, int64_t r0, Tensor& Z) {
              Device::template tile_grad<acc_t>(o, v0, r0, Z, grad_bias);
              Tensor dWt = per_tile ? tile_view(dw_tile, Z.size(1), D) : dw_full.narrow(0, v0, Z.size(1));
              engine.grads(r0, Z.size(0), Z, dh.narrow(0, r0 - c0, Z.size(0)), dWt, r0 > 0);
            },
            [&](int64_t v0, int64_t vt) {
              if (per_tile) grad_weight.narrow(0, v0, vt).copy_(tile_view(dw_tile, vt, D));
            });
      });
      for (int64_t p = 1; p < t.P; ++p) grad_hidden.narrow(0, c0, rc).add_(dh_private[p - 1].narrow(0, 0, rc));
    }
  });
  if (!in_place && !per_tile) grad_weight.copy_(dw_full);
  return {grad_hidden, grad_weight, grad_bias};
}

// The op entry points (their signatures are the schemas in ops.cpp): checks, device guard, the
// operands as one record, dtype dispatch.
template <typename Device>
std::tuple<Tensor, Tensor, Tensor> lle_forward(const Tensor& hidden, const Tensor& weight,
                                               const std::optional<Tensor>& bias, const Tensor& targets,
                                               const Tensor& inv_temp, bool compute_entropy) {
  check_inputs(hidden, weight, bias, targets, inv_temp, Device::kType);
  const c10::DeviceGuard guard(hidden.device());
  const Operands o = prepare_operands(hidden, weight, bias, targets, inv_temp);
  if (hidden.scalar_type() == at::kDouble) return forward_typed<Device, double>(o, compute_entropy);
  return forward_typed<Device, float>(o, compute_entropy);
}

template <typename Device>
std::tuple<Tensor, Tensor, Tensor> lle_backward(const Tensor& grad_logprob, const std::optional<Tensor>& grad_entropy,
                                                const Tensor& hidden, const Tensor& weight,
                                                const std::optional<Tensor>& bias, const Tensor& targets,
                                                const Tensor& inv_temp, const Tensor& lse, const Tensor& entropy) {
  check_inputs(hidden, weight, bias, targets, inv_temp, Device::kType);
  const c10::DeviceGuard guard(hidden.device());
  Operands o = prepare_operands(hidden, weight, bias, targets, inv_temp);
  prepare_backward(o, grad_logprob, grad_entropy, lse, entropy);
  if (hidden.scalar_type() == at::kDouble) return backward_typed<Device, double>(o);
  return backward_typed<Device, float>(o);
}

}  // namespace prepo_kernels
