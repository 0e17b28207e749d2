// Host-side helpers shared by the CPU (csrc/cpu) and CUDA (csrc/cuda) implementations of the
// prepo_kernels::lle_forward / lle_backward ops: input checks and tile-buffer views.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace prepo_kernels {

// The op's contract (prepo_kernels/backends/base.py): hidden [n, D], weight [V, D] and bias [V] of one
// float dtype, targets [n] int64, inv_temp [n], all on one device of `device_type`.
inline void check_inputs(const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                         const at::Tensor& targets, const at::Tensor& inv_temp, c10::DeviceType device_type) {
  TORCH_CHECK(hidden.device().type() == device_type, "prepo_kernels ", device_type,
              " kernel: hidden must be on ", device_type, ", got ", hidden.device());
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2, "hidden must be [n, D] and weight [V, D], got ",
              hidden.sizes(), " and ", weight.sizes());
  TORCH_CHECK(hidden.size(1) == weight.size(1), "hidden [n, D] and weight [V, D] disagree on D: ",
              hidden.sizes(), " vs ", weight.sizes());
  TORCH_CHECK(weight.size(0) > 0, "weight must have at least one row (V >= 1)");
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
inline at::ScalarType acc_type(const at::Tensor& hidden) {
  return hidden.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// A contiguous [rows, cols] view at the start of a flat buffer (tiles reuse one allocation).
inline at::Tensor tile_view(const at::Tensor& flat, int64_t rows, int64_t cols) {
  return flat.narrow(0, 0, rows * cols).view({rows, cols});
}

}  // namespace prepo_kernels
