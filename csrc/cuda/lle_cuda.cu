// CUDA device of the shared driver (csrc/lle_driver.h) for prepo_kernels::lle_forward / lle_backward
// (schemas in csrc/ops.cpp, semantics in prepo_kernels/backends/base.py): the element kernels of the
// two hooks and their launches.
//
// Deliberately simple: each (vocab tile, row block) logit tile is one cuBLAS matmul through ATen
// (the driver's BlasTiles: bf16 / fp16 tiles upcast to fp32, every product accumulates in fp32), then
//   tile statistics: one CUDA block per row computes the tile's max / sum e^{z-m} / sum e^{z-m}(z-m)
//                    and merges them into the row's running statistics (H = log s - t / s);
//   tile gradient:   an elementwise kernel turns Z into dz in place, db_tile += sum_rows dz.
// One partition (the tiles run in stream order). The fused Triton backend is the fast GPU path; this
// one is the plain, obviously-correct one. Only device-generic c10 APIs are used for the current
// stream (no ATen/cuda or c10/cuda headers), so the file also compiles against a CPU-only torch's
// headers (CI check).
#include <ATen/ATen.h>
#include <c10/core/Stream.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <torch/library.h>

#include "../lle_driver.h"

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


struct CudaDevice {
  static constexpr c10::DeviceType kType = c10::DeviceType::CUDA;

  static Tiling tiling(int64_t n, int64_t /*D*/, int64_t V, int64_t /*acc_bytes*/) {
    Tiling t;
    t.Vt = std::max<int64_t>(1, std::min(V, kVocabTile));
    t.ntiles = (V + t.Vt - 1) / t.Vt;
    t.P = 1;
    // rows of a tile are gridDim.y of the backward launch: at most 65535
    t.Nt = std::max<int64_t>(1, std::min({n, kTileElems / t.Vt, int64_t(32768)}));
    t.R = n;
    return t;
  }

  static at::ScalarType stats_dtype(at::ScalarType acc) { return acc; }

  template <typename F>
  static void parallel(int64_t P, const F& f) {
    for (int64_t p = 0; p < P; ++p) f(p);
  }

  template <typename acc_t, typename Run>
  static void with_engine(const Operands& o, bool /*backward*/, const Tiling& t, Run&& run) {
    run([&] { return BlasTiles<acc_t>(o.hidden, o.weight, t); });
  }

  template <typename acc_t>
  static void tile_stats(const Operands& o, int64_t v0, int64_t r0, const Tensor& Z, const Tensor& stats_p,
                         const Tensor& zy) {
    const int64_t nt = Z.size(0), vt = Z.size(1), n = o.n;
    acc_t* m = stats_p.data_ptr<acc_t>();
    forward_stats_kernel<acc_t><<<static_cast<unsigned>(nt), kThreads, 0, current_stream(Z.device())>>>(
        Z.data_ptr<acc_t>(), vt, o.bias.defined() ? o.bias.data_ptr<acc_t>() + v0 : nullptr,
        o.inv_temp.data_ptr<acc_t>() + r0, o.targets.data_ptr<int64_t>() + r0, v0, m + r0, m + n + r0,
        m + 2 * n + r0, zy.data_ptr<acc_t>() + r0);
    check_launch();
  }

  template <typename acc_t>
  static void tile_grad(const Operands& o, int64_t v0, int64_t r0, Tensor& Z, const Tensor& grad_bias) {
    const int64_t nt = Z.size(0), vt = Z.size(1);
    const bool has_e = o.e.defined();
    const unsigned col_blocks = static_cast<unsigned>(std::min<int64_t>((vt + kThreads - 1) / kThreads, 64));
    const dim3 grid(col_blocks, static_cast<unsigned>(nt));
    backward_dz_kernel<acc_t><<<grid, kThreads, 0, current_stream(Z.device())>>>(
        Z.data_ptr<acc_t>(), vt, o.bias.defined() ? o.bias.data_ptr<acc_t>() + v0 : nullptr,
        o.inv_temp.data_ptr<acc_t>() + r0, o.targets.data_ptr<int64_t>() + r0, v0, o.lse.data_ptr<acc_t>() + r0,
        o.g.data_ptr<acc_t>() + r0, has_e ? o.e.data_ptr<acc_t>() + r0 : nullptr,
        has_e ? o.H.data_ptr<acc_t>() + r0 : nullptr);
    check_launch();
    if (o.bias.defined()) grad_bias.narrow(0, v0, vt).add_(Z.sum(0));
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(prepo_kernels, CUDA, m) {
  m.impl("lle_forward", &lle_forward<CudaDevice>);
  m.impl("lle_backward", &lle_backward<CudaDevice>);
}

}  // namespace prepo_kernels
