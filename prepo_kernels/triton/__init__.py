"""Triton kernels for fused log-prob / entropy straight from hidden states and the LM head.

One kernel per file:
    tiles.py                   @triton.jit helpers shared by every kernel (logit tile, dz tile)
    forward.py                 forward: running max / sum exp / sum exp*(z-m), target gather
    merge.py                   merge of split-vocab partial forward stats
    backward_fused.py          backward, fast mode: one kernel, atomics into dh / dW / db
    backward_dh.py             backward, deterministic mode: dh (grid over rows, loop over vocab)
    backward_dw.py             backward, deterministic mode: dW, db (grid over vocab, loop over rows)
    backward.py                backward launcher choosing between the two modes
    grpo_rows.py               linear_grpo_loss's one-pass row pass: stats, then dL/dz in place
    config.py                  block sizes, tf32 / ieee choice, gradient-filter bound
    aot_check.py               compile every variant for sm_XX without a GPU, report regs/spills
                               (python -m prepo_kernels.triton.aot_check)

Precision: logits tiles come from tl.dot with fp32 accumulation (fp64 for fp64 inputs); fp32
inputs use tf32 only on a GPU and only when torch allows tf32 matmuls, else ieee. fp64 inputs are
supported everywhere (the interpreter, for gradcheck, and CUDA, slowly).

Importing this package imports triton; whether kernels are compiled for CUDA or run by Triton's
interpreter is decided when the kernels are *defined*, i.e. by TRITON_INTERPRET at import time of
these modules (triton.jit reads ``triton.knobs.runtime.interpret`` in its decorator).
"""
from .backward import triton_backward
from .forward import triton_forward

__all__ = ["triton_forward", "triton_backward"]
