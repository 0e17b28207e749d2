// Operator schemas of the prepo_kernels extension (built as the Python module prepo_kernels._C).
//
// lle_forward / lle_backward follow the backend contract in prepo_kernels/backends/base.py: dense rows only (the
// autograd layer has already dropped ignore_index rows and rows without gradient, and the public API
// has checked once that every target is in [0, V); the ops do not check it again), z never
// materialized as [n, V].
//
//   z        = (hidden @ weight.T + bias) * inv_temp[:, None]
//   lse      = logsumexp_v z
//   logprob  = z_y - lse
//   entropy  = lse - sum_v p_v z_v            (an empty tensor when compute_entropy is false)
//
//   dz_v     = g (1[v=y] - p_v) - e p_v (z_v - lse + H)
//   grad_hidden = (dz * inv_temp) @ W, grad_weight = (dz * inv_temp).T @ hidden,
//   grad_bias   = sum_rows dz * inv_temp      (an empty tensor when bias is None)
//
// Outputs are in the accumulation dtype (fp64 for fp64 inputs, fp32 otherwise), except grad_weight,
// which is in the weight's dtype: accumulated in fp32 per vocab tile and written once.
// Kernels: csrc/cpu/lle_cpu.cpp (CPU), csrc/cuda/lle_cuda.cu (CUDA, when built with CUDA).
//
// grpo_chunk_forward / grpo_chunk_backward are the one-pass GRPO loss's row chunks
// (prepo_kernels/backends/grpo_chunks.py, contract there), called per chunk of n rows around the
// objective's per-token gradient g = dL/dlogprob, e = dL/dentropy: forward writes the chunk's scaled
// logits, vocab-major [V, n], into zbuf and returns (logprob, entropy or [0], lse); backward turns
// them into dz * inv_temp in place (dz as above) and writes grad_hidden [n, D], adds to grad_weight
// [V, D] (the weight's dtype) and grad_bias ([V] or [0]). Kernel: csrc/cpu/grpo_loss_cpu.cpp (CPU).
#include <pybind11/pybind11.h>
#include <torch/library.h>

TORCH_LIBRARY(prepo_kernels, m) {
  m.def(
      "lle_forward(Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, Tensor inv_temp, "
      "bool compute_entropy) -> (Tensor logprob, Tensor entropy, Tensor lse)");
  m.def(
      "lle_backward(Tensor grad_logprob, Tensor? grad_entropy, Tensor hidden, Tensor weight, "
      "Tensor? bias, Tensor targets, Tensor inv_temp, Tensor lse, Tensor entropy) -> "
      "(Tensor grad_hidden, Tensor grad_weight, Tensor grad_bias)");
  m.def(
      "grpo_chunk_forward(Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, Tensor inv_temp, "
      "bool compute_entropy, int tile_rows, Tensor(a!) zbuf) -> (Tensor logprob, Tensor entropy, Tensor lse)");
  m.def(
      "grpo_chunk_backward(Tensor(a!) zbuf, Tensor hidden, Tensor weight, Tensor targets, Tensor inv_temp, "
      "Tensor lse, Tensor entropy, Tensor grad_logprob, Tensor? grad_entropy, int tile_rows, "
      "Tensor(b!) grad_hidden, Tensor(c!) grad_weight, Tensor(d!) grad_bias) -> ()");
}

// A Python module named _C so that `import prepo_kernels._C` loads this shared library, which runs
// the TORCH_LIBRARY registrations above (the ops then live under torch.ops.prepo_kernels).
#ifndef TORCH_EXTENSION_NAME
#define TORCH_EXTENSION_NAME _C
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "prepo_kernels native ops: torch.ops.prepo_kernels.lle_forward / lle_backward / grpo_chunk_*";
#ifdef PREPO_WITH_CUDA
  module.attr("built_with_cuda") = true;
#else
  module.attr("built_with_cuda") = false;
#endif
}
