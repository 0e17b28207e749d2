// CUDA kernels for prepo_kernels::lle_forward / lle_backward (schemas in csrc/ops.cpp, semantics in
// prepo_kernels/backends/base.py).
//
// Deliberately simple: the vocabulary is cut into tiles (outer loop) and the rows into blocks
// (inner loop); each (vocab tile, row block) logit tile Z = h_block @ W_tile^T is one cuBLAS matmul
// through ATen into a reused fp32 buffer (bf16 / fp16 tiles are upcast to fp32 first, so every
// product accumulates in fp32), then
//   forward : one CUDA block per row computes the tile's max / sum e^{z-m} / sum e^{z-m}(z-m) and
//             merges them into per-row running statistics (stable entropy: H = log s - t / s);
//   backward: an elementwise kernel turns Z into dz in place, then dh += dz @ W_tile,
//             dW_tile (+)= dz^T @ h_block, db_tile += sum_rows dz (cuBLAS / ATen again).
// The fused Triton backend is the fast GPU path; this one is the plain, obviously-correct one.
// Only device-generic c10 APIs are used for the device guard and the current stream (no ATen/cuda or
// c10/cuda headers), so the file also compiles against a CPU-only torch's headers (CI check).
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/Stream.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <torch/library.h>

#include "../lle_common.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <limits>
#include <tuple>

namespace prepo_kernels {
namespace {

using at::Tensor;

constexpr int kThreads = 256;
constexpr int64_t kTileElems = int64_t(1) << 24;  // fp32 logit tile: 64 MB
constexpr int64_t kVocabTile = 8192;

template <typename T>
__device__ __forceinline__ T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

__device__ __forceinline__ float exp_acc(float x) { return expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }
__device__ __forceinline__ float log_acc(float x) { return logf(x); }
__device__ __forceinline__ double log_acc(double x) { return log(x); }

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <typename T>
__device__ __forceinline__ T warp_max(T v) {
  for (int o = 16; o > 0; o >>= 1) {
    T other = __shfl_xor_sync(0xffffffffu, v, o);
    v = other > v ? other : v;
  }
  return v;
}

// Block-wide reductions (blockDim.x == kThreads); every thread gets the result.
template <typename T>
__device__ T block_max(T v, T* shared) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_max(v);
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  T r = threadIdx.x < (kThreads / 32) ? shared[threadIdx.x] : neg_inf<T>();
  if (warp == 0) r = warp_max(r);
  if (threadIdx.x == 0) shared[0] = r;
  __syncthreads();
  r = shared[0];
  __syncthreads();
  return r;
}

template <typename T>
__device__ T block_sum(T v, T* shared) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_sum(v);
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  T r = threadIdx.x < (kThreads / 32) ? shared[threadIdx.x] : T(0);
  if (warp == 0) r = warp_sum(r);
  if (threadIdx.x == 0) shared[0] = r;
  __syncthreads();
  r = shared[0];
  __syncthreads();
  return r;
}

// One block per row of the tile: statistics of z = (raw + b) * sc over the tile's vt columns,
// merged into the running (m, s, t) of the row; also records z_y when the target is in the tile.
template <typename T>
__global__ void forward_stats_kernel(const T* __restrict__ Z, int64_t vt, const T* __restrict__ bias_tile,
                                     const T* __restrict__ inv_temp, const int64_t* __restrict__ targets,
                                     int64_t v0, T* __restrict__ run_m, T* __restrict__ run_s,
                                     T* __restrict__ run_t, T* __restrict__ z_target) {
  __shared__ T shared[kThreads / 32];
  const int64_t row = blockIdx.x;  // row within the block of rows (pointers are pre-offset)
  const T* z = Z + row * vt;
  const T sc = inv_temp[row];

  T mx = neg_inf<T>();
  for (int64_t c = threadIdx.x; c < vt; c += kThreads) {
    const T v = (z[c] + (bias_tile != nullptr ? bias_tile[c] : T(0))) * sc;
    mx = v > mx ? v : mx;
  }
  const T m = block_max(mx, shared);

  T s = 0, t = 0;
  if (m > neg_inf<T>()) {
    for (int64_t c = threadIdx.x; c < vt; c += kThreads) {
      const T d = (z[c] + (bias_tile != nullptr ? bias_tile[c] : T(0))) * sc - m;
      if (d > neg_inf<T>()) {  // z = -inf contributes exactly 0
        const T e = exp_acc(d);
        s += e;
        t += e * d;
      }
    }
  }
  s = block_sum(s, shared);
  t = block_sum(t, shared);

  if (threadIdx.x == 0) {
    const int64_t yl = targets[row] - v0;
    if (yl >= 0 && yl < vt) z_target[row] = (z[yl] + (bias_tile != nullptr ? bias_tile[yl] : T(0))) * sc;
    if (s > 0) {
      const T M = run_m[row], S = run_s[row];
      if (m <= M) {
        const T a = exp_acc(m - M);
        run_s[row] = S + a * s;
        run_t[row] = run_t[row] + a * (t + (m - M) * s);
      } else {
        const T a = S > 0 ? exp_acc(M - m) : T(0);
        run_t[row] = (S > 0 ? a * (run_t[row] + (M - m) * S) : T(0)) + t;
        run_s[row] = a * S + s;
        run_m[row] = m;
      }
    }
  }
}

template <typename T>
__global__ void forward_finalize_kernel(int64_t n, const T* __restrict__ run_m, const T* __restrict__ run_s,
                                        const T* __restrict__ run_t, const T* __restrict__ z_target,
                                        T* __restrict__ logprob, T* __restrict__ entropy, T* __restrict__ lse) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= n) return;
  const T logs = log_acc(run_s[i]);
  const T l = run_m[i] + logs;
  lse[i] = l;
  logprob[i] = z_target[i] - l;
  if (entropy != nullptr) entropy[i] = logs - run_t[i] / run_s[i];
}

// In place: raw logits in, dz * sc out, with z = (raw + b) * sc, p = exp(z - lse),
// dz = g (1[v=y] - p) - e p (z - lse + H).
template <typename T>
__global__ void backward_dz_kernel(T* __restrict__ Z, int64_t vt, const T* __restrict__ bias_tile,
                                   const T* __restrict__ inv_temp, const int64_t* __restrict__ targets, int64_t v0,
                                   const T* __restrict__ lse, const T* __restrict__ g, const T* __restrict__ e,
                                   const T* __restrict__ H) {
  const int64_t row = blockIdx.y;
  T* z = Z + row * vt;
  const T sc = inv_temp[row], l = lse[row], gi = g[row];
  const T ei = e != nullptr ? e[row] : T(0);
  const T Hi = e != nullptr ? H[row] : T(0);
  const int64_t yl = targets[row] - v0;
  for (int64_t c = blockIdx.x * int64_t(kThreads) + threadIdx.x; c < vt; c += int64_t(gridDim.x) * kThreads) {
    const T d = (z[c] + (bias_tile != nullptr ? bias_tile[c] : T(0))) * sc - l;
    T dz = 0;
    if (d > neg_inf<T>()) {
      const T p = exp_acc(d);
      dz = -p * (gi + ei * (d + Hi));
    }
    if (c == yl) dz += gi;
    z[c] = dz * sc;
  }
}

// The current CUDA stream of `device`, through the device-generic guard interface.
cudaStream_t current_stream(const c10::Device& device) {
  const c10::impl::VirtualGuardImpl impl(c10::DeviceType::CUDA);
  return static_cast<cudaStream_t>(impl.getStream(device).native_handle());
}

void check_launch() {
  const cudaError_t err = cudaGetLastError();
  TORCH_CHECK(err == cudaSuccess, "prepo_kernels CUDA kernel launch failed: ", cudaGetErrorString(err));
}


struct Tiles {
  int64_t rows, vocab;
};

Tiles pick_tiles(int64_t n, int64_t V) {
  const int64_t vt = std::max<int64_t>(1, std::min(V, kVocabTile));
  // rows of a tile are gridDim.y of the backward launch: at most 65535
  const int64_t nt = std::max<int64_t>(1, std::min({n, kTileElems / vt, int64_t(32768)}));
  return {nt, vt};
}

template <typename acc_t>
std::tuple<Tensor, Tensor, Tensor> forward_impl(const Tensor& hidden_in, const Tensor& weight_in,
                                                const std::optional<Tensor>& bias_in, const Tensor& targets_in,
                                                const Tensor& inv_temp_in, bool compute_entropy) {
  const auto acc = acc_type(hidden_in);
  const int64_t n = hidden_in.size(0), D = hidden_in.size(1), V = weight_in.size(0);
  auto fopts = hidden_in.options().dtype(acc);
  Tensor logprob = at::empty({n}, fopts);
  Tensor lse = at::empty({n}, fopts);
  Tensor entropy = at::empty({compute_entropy ? n : 0}, fopts);
  if (n == 0) return {logprob, entropy, lse};

  const Tensor hidden = hidden_in.contiguous();
  const Tensor weight = weight_in.contiguous();
  const Tensor targets = targets_in.contiguous();
  const Tensor inv_temp = inv_temp_in.to(acc).contiguous();
  Tensor bias;
  if (bias_in.has_value()) bias = bias_in->to(acc).contiguous();
  const bool lowp = hidden.scalar_type() != acc;
  const cudaStream_t stream = current_stream(hidden.device());

  Tensor run_m = at::full({n}, -std::numeric_limits<double>::infinity(), fopts);
  Tensor run_s = at::zeros({n}, fopts);
  Tensor run_t = at::zeros({n}, fopts);
  Tensor z_target = at::zeros({n}, fopts);

  const Tiles tiles = pick_tiles(n, V);
  Tensor zbuf = at::empty({tiles.rows * tiles.vocab}, fopts);
  Tensor wbuf = lowp ? at::empty({tiles.vocab * D}, fopts) : Tensor();
  Tensor hbuf = lowp ? at::empty({tiles.rows * D}, fopts) : Tensor();
  const acc_t* bp = bias.defined() ? bias.data_ptr<acc_t>() : nullptr;

  for (int64_t v0 = 0; v0 < V; v0 += tiles.vocab) {
    const int64_t vt = std::min(tiles.vocab, V - v0);
    Tensor Wt = weight.narrow(0, v0, vt);
    if (lowp) Wt = tile_view(wbuf, vt, D).copy_(Wt);
    for (int64_t r0 = 0; r0 < n; r0 += tiles.rows) {
      const int64_t nt = std::min(tiles.rows, n - r0);
      Tensor hb = hidden.narrow(0, r0, nt);
      if (lowp) hb = tile_view(hbuf, nt, D).copy_(hb);
      Tensor Z = tile_view(zbuf, nt, vt);
      at::mm_out(Z, hb, Wt.t());
      forward_stats_kernel<acc_t><<<static_cast<unsigned>(nt), kThreads, 0, stream>>>(
          Z.data_ptr<acc_t>(), vt, bp != nullptr ? bp + v0 : nullptr, inv_temp.data_ptr<acc_t>() + r0,
          targets.data_ptr<int64_t>() + r0, v0, run_m.data_ptr<acc_t>() + r0, run_s.data_ptr<acc_t>() + r0,
          run_t.data_ptr<acc_t>() + r0, z_target.data_ptr<acc_t>() + r0);
      check_launch();
    }
  }
  const unsigned blocks = static_cast<unsigned>((n + kThreads - 1) / kThreads);
  forward_finalize_kernel<acc_t><<<blocks, kThreads, 0, stream>>>(
      n, run_m.data_ptr<acc_t>(), run_s.data_ptr<acc_t>(), run_t.data_ptr<acc_t>(), z_target.data_ptr<acc_t>(),
      logprob.data_ptr<acc_t>(), compute_entropy ? entropy.data_ptr<acc_t>() : nullptr, lse.data_ptr<acc_t>());
  check_launch();
  return {logprob, entropy, lse};
}

template <typename acc_t>
std::tuple<Tensor, Tensor, Tensor> backward_impl(const Tensor& grad_logprob, const std::optional<Tensor>& grad_entropy,
                                                 const Tensor& hidden_in, const Tensor& weight_in,
                                                 const std::optional<Tensor>& bias_in, const Tensor& targets_in,
                                                 const Tensor& inv_temp_in, const Tensor& lse_in,
                                                 const Tensor& entropy_in) {
  const auto acc = acc_type(hidden_in);
  const int64_t n = hidden_in.size(0), D = hidden_in.size(1), V = weight_in.size(0);
  auto fopts = hidden_in.options().dtype(acc);
  Tensor grad_hidden = at::zeros({n, D}, fopts);
  Tensor grad_weight = at::zeros({V, D}, fopts);
  Tensor grad_bias = bias_in.has_value() ? at::zeros({V}, fopts) : at::empty({0}, fopts);
  if (n == 0) return {grad_hidden, grad_weight, grad_bias};

  const bool has_e = grad_entropy.has_value() && grad_entropy->defined();
  const Tensor hidden = hidden_in.contiguous();
  const Tensor weight = weight_in.contiguous();
  const Tensor targets = targets_in.contiguous();
  const Tensor inv_temp = inv_temp_in.to(acc).contiguous();
  const Tensor g = grad_logprob.to(acc).contiguous();
  const Tensor lse = lse_in.to(acc).contiguous();
  Tensor e, H;
  if (has_e) {
    TORCH_CHECK(grad_entropy->dim() == 1 && grad_entropy->size(0) == n, "grad_entropy must be [n]");
    TORCH_CHECK(entropy_in.dim() == 1 && entropy_in.size(0) == n,
                "entropy must be [n] when grad_entropy is given (forward ran with compute_entropy=False?)");
    e = grad_entropy->to(acc).contiguous();
    H = entropy_in.to(acc).contiguous();
  }
  Tensor bias;
  if (bias_in.has_value()) bias = bias_in->to(acc).contiguous();
  const bool lowp = hidden.scalar_type() != acc;
  const cudaStream_t stream = current_stream(hidden.device());

  const Tiles tiles = pick_tiles(n, V);
  Tensor zbuf = at::empty({tiles.rows * tiles.vocab}, fopts);
  Tensor wbuf = lowp ? at::empty({tiles.vocab * D}, fopts) : Tensor();
  Tensor hbuf = lowp ? at::empty({tiles.rows * D}, fopts) : Tensor();
  const acc_t* bp = bias.defined() ? bias.data_ptr<acc_t>() : nullptr;

  for (int64_t v0 = 0; v0 < V; v0 += tiles.vocab) {
    const int64_t vt = std::min(tiles.vocab, V - v0);
    Tensor Wt = weight.narrow(0, v0, vt);
    if (lowp) Wt = tile_view(wbuf, vt, D).copy_(Wt);
    Tensor dWt = grad_weight.narrow(0, v0, vt);
    for (int64_t r0 = 0; r0 < n; r0 += tiles.rows) {
      const int64_t nt = std::min(tiles.rows, n - r0);
      Tensor hb = hidden.narrow(0, r0, nt);
      if (lowp) hb = tile_view(hbuf, nt, D).copy_(hb);
      Tensor Z = tile_view(zbuf, nt, vt);
      at::mm_out(Z, hb, Wt.t());
      const unsigned col_blocks = static_cast<unsigned>(std::min<int64_t>((vt + kThreads - 1) / kThreads, 64));
      const dim3 grid(col_blocks, static_cast<unsigned>(nt));
      backward_dz_kernel<acc_t><<<grid, kThreads, 0, stream>>>(
          Z.data_ptr<acc_t>(), vt, bp != nullptr ? bp + v0 : nullptr, inv_temp.data_ptr<acc_t>() + r0,
          targets.data_ptr<int64_t>() + r0, v0, lse.data_ptr<acc_t>() + r0, g.data_ptr<acc_t>() + r0,
          has_e ? e.data_ptr<acc_t>() + r0 : nullptr, has_e ? H.data_ptr<acc_t>() + r0 : nullptr);
      check_launch();
      if (bias.defined()) grad_bias.narrow(0, v0, vt).add_(Z.sum(0));
      grad_hidden.narrow(0, r0, nt).addmm_(Z, Wt);
      dWt.addmm_(Z.t(), hb);
    }
  }
  return {grad_hidden, grad_weight, grad_bias};
}

std::tuple<Tensor, Tensor, Tensor> lle_forward_cuda(const Tensor& hidden, const Tensor& weight,
                                                    const std::optional<Tensor>& bias, const Tensor& targets,
                                                    const Tensor& inv_temp, bool compute_entropy) {
  check_inputs(hidden, weight, bias, targets, inv_temp, c10::DeviceType::CUDA);
  TORCH_CHECK(hidden.size(0) <= std::numeric_limits<int32_t>::max(), "too many rows for one launch");
  const c10::DeviceGuard guard(hidden.device());
  if (hidden.scalar_type() == at::kDouble)
    return forward_impl<double>(hidden, weight, bias, targets, inv_temp, compute_entropy);
  return forward_impl<float>(hidden, weight, bias, targets, inv_temp, compute_entropy);
}

std::tuple<Tensor, Tensor, Tensor> lle_backward_cuda(const Tensor& grad_logprob, const std::optional<Tensor>& grad_entropy,
                                                     const Tensor& hidden, const Tensor& weight,
                                                     const std::optional<Tensor>& bias, const Tensor& targets,
                                                     const Tensor& inv_temp, const Tensor& lse, const Tensor& entropy) {
  check_inputs(hidden, weight, bias, targets, inv_temp, c10::DeviceType::CUDA);
  const int64_t n = hidden.size(0);
  TORCH_CHECK(grad_logprob.dim() == 1 && grad_logprob.size(0) == n, "grad_logprob must be [n], got ",
              grad_logprob.sizes());
  TORCH_CHECK(lse.dim() == 1 && lse.size(0) == n, "lse must be [n], got ", lse.sizes());
  const c10::DeviceGuard guard(hidden.device());
  if (hidden.scalar_type() == at::kDouble)
    return backward_impl<double>(grad_logprob, grad_entropy, hidden, weight, bias, targets, inv_temp, lse, entropy);
  return backward_impl<float>(grad_logprob, grad_entropy, hidden, weight, bias, targets, inv_temp, lse, entropy);
}

}  // namespace

TORCH_LIBRARY_IMPL(prepo_kernels, CUDA, m) {
  m.impl("lle_forward", &lle_forward_cuda);
  m.impl("lle_backward", &lle_backward_cuda);
}

}  // namespace prepo_kernels
