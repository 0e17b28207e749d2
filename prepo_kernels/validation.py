"""Input checks for the public API. Each failure is a ValueError or TypeError naming the argument.

Checks on types, dtypes, devices and shapes are plain Python: under ``torch.compile`` they run
while tracing (shapes and dtypes are part of the compiled graph's guards) and add nothing to the
graph. Checks on *values* (target ids in range, temperatures finite and > 0, masks 0/1,
cu_seqlens offsets) are custom ops that return the checked tensor: the compiler treats them as
opaque calls, so they run, and raise the same ValueError, every time the compiled graph runs.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch

Temperature = Union[float, torch.Tensor]
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_tensor(name: str, value, *, floating: bool = False, integer: bool = False) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if floating and value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {value.dtype}")
    if integer and value.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must be an int64 (or int32) tensor of token ids, got {value.dtype}")


def check_same_device(**tensors: Optional[torch.Tensor]) -> None:
    named = [(k, v) for k, v in tensors.items() if isinstance(v, torch.Tensor)]
    first_name, first = named[0]
    for name, tensor in named[1:]:
        if tensor.device != first.device:
            raise ValueError(
                f"{name} is on {tensor.device} but {first_name} is on {first.device}; "
                "move all tensors to one device"
            )


def _targets_error(targets: torch.Tensor, vocab: int, ignore_index: int) -> Optional[str]:
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
    if not bool(bad.any()):
        return None
    return (
        f"targets contains {int(targets[bad][0])}, outside [0, {vocab}) (vocab size from weight) "
        f"and not ignore_index={ignore_index}"
    )


@torch.library.custom_op("prepo_kernels::checked_targets", mutates_args=())
def checked_targets(targets: torch.Tensor, vocab: int, ignore_index: int) -> torch.Tensor:
    """targets [...] int -> the same ids as int64, after checking that each is in [0, vocab) or
    equals ignore_index (ValueError otherwise; one device sync). An op so that the check, which
    depends on the data, also runs inside a compiled graph."""
    message = _targets_error(targets, vocab, ignore_index)
    if message is not None:
        raise ValueError(message)
    return targets.to(torch.int64, copy=True)


@checked_targets.register_fake
def _checked_targets_fake(targets, vocab, ignore_index):
    return targets.new_empty(targets.shape, dtype=torch.int64)


@torch.library.custom_op("prepo_kernels::checked_inv_temperature", mutates_args=())
def checked_inv_temperature(temperature: torch.Tensor) -> torch.Tensor:
    """1 / temperature, after checking that every entry is finite and > 0 (ValueError otherwise)."""
    if not bool(((temperature > 0) & torch.isfinite(temperature)).all()):
        raise ValueError("temperature must be finite and > 0 everywhere")
    return temperature.reciprocal()


@checked_inv_temperature.register_fake
def _checked_inv_temperature_fake(temperature):
    return torch.empty_like(temperature)


def _broadcasts(shape: tuple, to: tuple) -> bool:
    """Whether ``shape`` broadcasts to ``to`` (decided on static shapes, so it compiles)."""
    if len(shape) > len(to):
        return False
    return all(s in (1, t) for s, t in zip(reversed(shape), reversed(to)))


def temperature_per_row(
    temperature: Union[float, torch.Tensor], targets: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """The inverse temperature for each flattened row: [N] of ``dtype``."""
    if isinstance(temperature, torch.Tensor):
        # elsewhere only a one-element CPU tensor, as PyTorch takes CPU scalars along (a meta one
        # would fail to copy with NotImplementedError)
        if temperature.device != targets.device and not (temperature.numel() == 1 and temperature.device.type == "cpu"):
            raise ValueError(f"temperature is on {temperature.device} but targets is on {targets.device}")
        if not temperature.dtype.is_floating_point:
            raise TypeError(f"temperature must be a float tensor, got {temperature.dtype}")
        if not _broadcasts(tuple(temperature.shape), tuple(targets.shape)):
            raise ValueError(
                f"temperature of shape {tuple(temperature.shape)} does not broadcast to targets' shape "
                f"{tuple(targets.shape)}"
            )
        temp = torch.broadcast_to(temperature.detach().to(targets.device, dtype), targets.shape)
        return checked_inv_temperature(temp.reshape(-1))
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a float or a tensor, got {type(temperature).__name__}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")
    return torch.full((targets.numel(),), 1.0 / temperature, dtype=dtype, device=targets.device)


def check_linear_inputs(hidden, weight, targets, bias, ignore_index) -> None:
    check_tensor("hidden", hidden, floating=True)
    check_tensor("weight", weight, floating=True)
    check_tensor("targets", targets, integer=True)
    if bias is not None:
        check_tensor("bias", bias, floating=True)
    check_same_device(hidden=hidden, weight=weight, targets=targets, bias=bias)
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [V, D], got shape {tuple(weight.shape)}")
    if weight.numel() == 0:  # before the checks against V and D, which would blame bias or hidden
        raise ValueError(f"empty input: weight of shape {tuple(weight.shape)} (need V, D >= 1)")
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden's last dim ({hidden.shape[-1] if hidden.dim() else 'none'}) must equal weight's "
            f"hidden size D={weight.shape[1]}"
        )
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype {weight.dtype} differs from hidden dtype {hidden.dtype}")
    if bias is not None and (bias.shape != (weight.shape[0],) or bias.dtype != hidden.dtype):
        raise ValueError(
            f"bias must be [V]=[{weight.shape[0]}] of {hidden.dtype}, got {tuple(bias.shape)} {bias.dtype}"
        )
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(
            f"targets shape {tuple(targets.shape)} must equal hidden's leading dims {tuple(hidden.shape[:-1])}"
        )
    if targets.numel() == 0 or weight.numel() == 0:
        raise ValueError(
            f"empty input: hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)} (need N, D, V >= 1)"
        )
    if not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
