"""Launch configuration shared by the triton kernels (no kernels here)."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton


def interpreting() -> bool:
    """True when kernels run under Triton's CPU interpreter (TRITON_INTERPRET=1)."""
    try:
        return bool(triton.knobs.runtime.interpret)
    except AttributeError:  # older triton without knobs
        return os.environ.get("TRITON_INTERPRET", "0") == "1"


def input_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision.

    fp32 inputs use tf32 only on a GPU and only when torch itself allows tf32 matmuls
    (``torch.backends.cuda.matmul.allow_tf32``), so the fused kernel is never less precise than the
    unfused torch baseline under the same settings. fp64, 16-bit inputs and the interpreter: "ieee"
    (for 16-bit inputs the precision flag does not matter; tensor cores take them natively)."""
    if dtype != torch.float32 or interpreting():
        return "ieee"
    matmul = torch.backends.cuda.matmul
    try:
        allow = getattr(matmul, "fp32_precision", None) == "tf32" or bool(matmul.allow_tf32)
    except Exception:  # pragma: no cover - torch without these flags
        allow = False
    return "tf32" if allow else "ieee"


def upcast_dots(dtype: torch.dtype) -> bool:
    """Under the interpreter (triton 3.x) tl.dot returns garbage for bf16 operands, so 16-bit tiles
    are converted to fp32 before each dot there (exact products; same arithmetic as a tensor core
    with fp32 accumulation). Compiled kernels keep 16-bit operands."""
    return interpreting() and dtype in (torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class Blocks:
    BLOCK_N: int
    BLOCK_V: int
    BLOCK_D: int
    num_warps: int = 4
    num_stages: int = 2


def _pow2_at_least(x: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(x), 1))))


# GPU block sizes were chosen by compiling every kernel ahead of time for sm_90 (triton.compile with
# GPUTarget("cuda", 90, 32), D/V/n divisible by 16 as the JIT specializes them) and reading register /
# stack use with cuobjdump -res-usage: the largest tiles that compile without register spills.
# They are not tuned by timing (no GPU was available when they were written).
def forward_blocks(n: int, V: int, D: int, dtype: torch.dtype) -> Blocks:
    if interpreting():
        # few large blocks: the interpreter is vectorised per program, so fewer programs = faster
        return Blocks(_pow2_at_least(n, 16, 64), _pow2_at_least(V, 16, 128), _pow2_at_least(D, 16, 64))
    if dtype == torch.float64:
        return Blocks(_pow2_at_least(n, 16, 32), 32, 16, num_warps=4, num_stages=2)
    if dtype == torch.float32:
        return Blocks(_pow2_at_least(n, 16, 64), 128, 32, num_warps=8, num_stages=2)
    return Blocks(_pow2_at_least(n, 16, 128), 128, 64, num_warps=8, num_stages=3)  # 255 regs, no spill


def backward_blocks(n: int, V: int, D: int, dtype: torch.dtype, deterministic: bool = False) -> Blocks:
    """Blocks for backward_fused (fast mode) or for backward_dh + backward_dw (deterministic mode;
    both kernels use the same tiles so they make the same gradient-filter decisions)."""
    if interpreting():
        return Blocks(_pow2_at_least(n, 16, 64), _pow2_at_least(V, 16, 64), _pow2_at_least(D, 16, 64))
    if dtype == torch.float64:
        return Blocks(_pow2_at_least(n, 16, 32), 32, 16, num_warps=4, num_stages=2)
    if dtype == torch.float32:  # ieee fp32 dots run on FMA units; small tiles avoid spills
        if deterministic:
            return Blocks(_pow2_at_least(n, 16, 64), 64, 16, num_warps=4, num_stages=2)
        return Blocks(_pow2_at_least(n, 16, 32), 64, 32, num_warps=4, num_stages=2)
    if deterministic:
        return Blocks(_pow2_at_least(n, 16, 64), 128, 64, num_warps=8, num_stages=2)
    return Blocks(_pow2_at_least(n, 16, 128), 128, 64, num_warps=8, num_stages=2)


def grpo_rows_blocks(V: int, dtype: torch.dtype) -> tuple[int, int]:
    """(BLOCK_V, num_warps) of grpo_rows.py's kernels (one program per row, one streaming pass each
    over its V logits of ``dtype``, fp32 or fp64); a row shorter than the tile takes the power of 2
    at or above V. GPU: 128 bytes of logits per thread and tile (32 fp32, Liger's cross-entropy
    ratio of 32768 per 32 warps): compiled for sm_90 without spills, at most 108 registers (fp32)
    and 122 (fp64) (aot_check; 32768 per 32 warps spills). Not timed: no GPU was available."""
    if interpreting():  # few large tiles: the interpreter is vectorised per program
        return _pow2_at_least(V, 16, 8192), 4
    if dtype == torch.float64:
        return _pow2_at_least(V, 16, 4096), 8
    return _pow2_at_least(V, 16, 8192), 8


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: a few splits are enough to exercise the merge


def forward_splits(n: int, V: int, blocks: Blocks, device: torch.device) -> int:
    """How many programs share one row block's vocabulary: enough to fill ~2 waves of SMs when
    n is small, never more than the number of vocab tiles."""
    row_blocks = triton.cdiv(max(n, 1), blocks.BLOCK_N)
    v_tiles = triton.cdiv(V, blocks.BLOCK_V)
    target = 2 * num_sms(device)
    splits = triton.cdiv(target, row_blocks) if row_blocks < target else 1
    return max(1, min(splits, v_tiles))


# ---- gradient filter (bf16 / fp16 only) ------------------------------------------------------
# A vocab tile [BLOCK_N rows x BLOCK_V vocab] of dz is skipped in backward when, for every row i in
# the tile, sum_v |dz_iv| <= FILTER_BUDGET(dtype) * (|g_i| + |e_i|) * inv_temp_i / num_vocab_tiles.
# Summed over all tiles, the dz mass dropped from a row is then at most
#     unit_roundoff(dtype) * (|g_i| + |e_i|) * inv_temp_i,
# i.e. the gradient error is bounded by the dtype's own rounding of a gradient of that scale
# (|dh_i - dh_i_exact| <= u * (|g_i|+|e_i|) * inv_temp_i * max_v |W_v|, same for dW rows).
# This is stricter than Cut Cross-Entropy's per-element eps (2^-12 for bf16): it bounds the *sum*
# of what is dropped, so a flat distribution over a large vocabulary is never filtered wholesale.
UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def filter_budget(dtype: torch.dtype, V: int, block_v: int) -> float:
    """Per-tile L1 budget factor, or 0.0 when filtering does not apply to ``dtype``."""
    u = UNIT_ROUNDOFF.get(dtype)
    if u is None:
        return 0.0
    return u / triton.cdiv(V, block_v)
