"""Compile every kernel variant ahead of time for a CUDA target, no GPU needed.

    python -m prepo_kernels.triton.aot_check [--arch 90] [--dtypes bf16,fp16,fp32,fp64]
                                             [--kernels forward,backward,grpo_rows]

Runs the full Triton pipeline (TTIR -> TTGIR -> LLVM -> PTX -> cubin with the ptxas bundled in the
triton wheel) for the launch configurations config.py picks on a GPU, and reports registers and
stack (spill) bytes per kernel from ``cuobjdump -res-usage``. It catches code that the interpreter
accepts but the compiler rejects, and register spills, on a machine without a GPU. Exit status 1
if any variant fails to compile. Must run with TRITON_INTERPRET unset (the kernels are defined
when this module imports them).
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator, NamedTuple


# the shape the launch configurations are picked for (a large batch of a 128k-vocabulary model)
_N, _V, _D = 8192, 131072, 4096
_TORCH_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "fp64": "float64"}


class _Variant(NamedTuple):
    kernel: object
    names: list  # argument names
    types: list  # their Triton types ("*bf16", "i32", ...)
    consts: dict  # constexpr values
    blocks: object  # config.Blocks: num_warps, num_stages
    label: str


def _forward_variants(name: str, dt) -> Iterator[_Variant]:
    """The forward kernel in three (bias, entropy, split) configurations, and the merge kernel."""
    import torch

    from . import config
    from .forward import _forward_kernel
    from .merge import _merge_kernel

    ptr, acc = "*" + name, "*fp64" if dt == torch.float64 else "*fp32"
    fb = config.forward_blocks(_N, _V, _D, dt)
    names = ["h_ptr", "w_ptr", "b_ptr", "y_ptr", "it_ptr", "logprob_ptr", "ent_ptr", "lse_ptr",
             "pm_ptr", "ps_ptr", "pt_ptr", "pzy_ptr", "n", "V", "D", "v_per_split"]
    types = [ptr, ptr, ptr, "*i64"] + [acc] * 8 + ["i32"] * 4
    for has_bias, ent, split in ((True, True, True), (False, True, False), (False, False, True)):
        consts = dict(HAS_BIAS=has_bias, COMPUTE_ENTROPY=ent, SPLIT=split, **_common_flags(dt),
                      BLOCK_N=fb.BLOCK_N, BLOCK_V=fb.BLOCK_V, BLOCK_D=fb.BLOCK_D)
        yield _Variant(_forward_kernel, names, types, consts, fb,
                       f"forward {name} bias={has_bias} entropy={ent} split={split} {fb}")
    yield _Variant(_merge_kernel, ["pm_ptr", "ps_ptr", "pt_ptr", "pzy_ptr", "logprob_ptr", "ent_ptr", "lse_ptr",
                                   "n", "num_splits"], [acc] * 7 + ["i32", "i32"],
                   dict(COMPUTE_ENTROPY=True, BLOCK=128), config.Blocks(128, 0, 0, num_warps=4, num_stages=1),
                   f"merge {name}")


def _backward_variants(name: str, dt) -> Iterator[_Variant]:
    """Both backward modes (fused; deterministic dh + dW) with and without bias and entropy."""
    import torch

    from . import config
    from .backward_dh import _backward_dh_kernel
    from .backward_dw import _backward_dw_kernel
    from .backward_fused import _backward_fused_kernel

    ptr, acc = "*" + name, "*fp64" if dt == torch.float64 else "*fp32"
    names = ["h_ptr", "w_ptr", "b_ptr", "y_ptr", "it_ptr", "lse_ptr", "ent_ptr", "g_ptr", "e_ptr"]
    types = [ptr, ptr, ptr, "*i64"] + [acc] * 5
    sizes, size_types = ["n", "V", "D", "filter_budget"], ["i32", "i32", "i32", "fp32"]
    filt = dt in (torch.bfloat16, torch.float16)
    for has_bias, has_e in ((True, True), (False, False)):
        for det in (False, True):
            bb = config.backward_blocks(_N, _V, _D, dt, det)
            consts = dict(HAS_BIAS=has_bias, HAS_E=has_e, FILTER=filt, **_common_flags(dt),
                          BLOCK_N=bb.BLOCK_N, BLOCK_V=bb.BLOCK_V, BLOCK_D=bb.BLOCK_D)
            tag = f"{name} bias={has_bias} e={has_e} filter={filt} {bb}"
            if det:
                yield _Variant(_backward_dh_kernel, names + ["dh_ptr"] + sizes, types + [acc] + size_types,
                               consts, bb, f"backward_dh {tag}")
                yield _Variant(_backward_dw_kernel, names + ["dw_ptr", "db_ptr"] + sizes,
                               types + [acc, acc] + size_types, consts, bb, f"backward_dw {tag}")
            else:
                yield _Variant(_backward_fused_kernel, names + ["dh_ptr", "dw_ptr", "db_ptr"] + sizes,
                               types + [acc, acc, acc] + size_types, dict(consts, GROUP_N=8), bb,
                               f"backward_fused {tag}")


def _grpo_rows_variants(name: str, dt) -> Iterator[_Variant]:
    """The one-pass GRPO loss's row kernels on the logits of ``dt`` inputs (fp32, fp64 for fp64): the
    statistics kernel with and without entropy, the gradient kernel with and without dL/dentropy."""
    import torch

    from . import config
    from .grpo_rows import _grpo_grad_kernel, _grpo_stats_kernel

    acc = "*fp64" if dt == torch.float64 else "*fp32"
    block_v, num_warps = config.grpo_rows_blocks(_V, torch.float64 if dt == torch.float64 else torch.float32)
    blocks = config.Blocks(1, block_v, 0, num_warps=num_warps, num_stages=1)
    tag = f"{acc[1:]} logits ({name} inputs) BLOCK_V={block_v} num_warps={num_warps}"
    stats_names = ["z_ptr", "y_ptr", "it_ptr", "logprob_ptr", "ent_ptr", "lse_ptr", "V"]
    stats_types = [acc, "*i64"] + [acc] * 4 + ["i32"]
    for ent in (False, True):
        yield _Variant(_grpo_stats_kernel, stats_names, stats_types, dict(COMPUTE_ENTROPY=ent, BLOCK_V=block_v),
                       blocks, f"grpo_stats {tag} entropy={ent}")
    grad_names = ["z_ptr", "y_ptr", "it_ptr", "lse_ptr", "ent_ptr", "g_ptr", "e_ptr", "V"]
    grad_types = [acc, "*i64"] + [acc] * 5 + ["i32"]
    for has_e in (False, True):
        yield _Variant(_grpo_grad_kernel, grad_names, grad_types, dict(HAS_E=has_e, BLOCK_V=block_v), blocks,
                       f"grpo_grad {tag} entropy_grad={has_e}")


_FAMILIES = {"forward": _forward_variants, "backward": _backward_variants, "grpo_rows": _grpo_rows_variants}


def _common_flags(dt) -> dict:
    import torch

    return dict(IS_FP64=dt == torch.float64, PRECISION="ieee", UPCAST=False)


def _compile_one(v: _Variant, target, verbose: bool) -> bool:
    """Compile one variant for ``target``; print its register / stack / shared-memory use, or why it
    failed (the whole message with ``verbose``). True when it compiled."""
    import triton
    from triton.compiler import ASTSource

    sig = dict(zip(v.names, v.types))
    sig.update({k: "constexpr" for k in v.consts})
    # what the JIT does for pointers and for ints divisible by 16 (D, V, n at real shapes)
    attrs = {(i,): [["tt.divisibility", 16]] for i, (k, t) in enumerate(sig.items())
             if t.startswith("*") or k in ("n", "V", "D", "v_per_split")}
    src = ASTSource(fn=v.kernel, signature=sig, constexprs=v.consts, attrs=attrs)
    try:
        k = triton.compile(src, target=target,
                           options={"num_warps": v.blocks.num_warps, "num_stages": v.blocks.num_stages})
    except Exception as exc:  # noqa: BLE001  (report every failing variant, then exit 1)
        message = str(exc) if verbose else str(exc)[:1500]
        print(f"FAIL {v.label}: {type(exc).__name__}: {message}", flush=True)
        return False
    print(f"ok   {v.label}: {_resource_usage(k.asm['cubin'])} smem {k.metadata.shared} B", flush=True)
    return True


def _resource_usage(cubin: bytes) -> str:
    """"regs R, stack S B" from ``cuobjdump -res-usage`` (bundled with triton), or "" without it."""
    import triton

    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not cuobjdump.exists():
        return ""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(cuobjdump), "-res-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+)\s+STACK:(\d+)", out)
    return f"regs {m.group(1)}, stack {m.group(2)} B" if m else ""


def _compile_all(arch: int, dtypes: list[str], kernels: list[str], verbose: bool) -> int:
    """Compile every variant of ``kernels`` (families of _FAMILIES) for sm_``arch``; the number that
    failed. grpo_rows runs on fp32 logits for bf16 / fp16 / fp32 inputs alike: compiled once."""
    import torch
    from triton.backends.compiler import GPUTarget

    target = GPUTarget("cuda", arch, 32)
    failures, logits_done = 0, set()
    for name in dtypes:
        dt = getattr(torch, _TORCH_DTYPES[name])
        for family in kernels:
            if family == "grpo_rows":
                if (dt == torch.float64) in logits_done:
                    continue
                logits_done.add(dt == torch.float64)
            for variant in _FAMILIES[family](name, dt):
                failures += not _compile_one(variant, target, verbose)
    return failures


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability as an int (80, 90, ...)")
    p.add_argument("--dtypes", default="bf16,fp16,fp32,fp64")
    p.add_argument("--kernels", default=",".join(_FAMILIES), help="kernel families to compile")
    p.add_argument("-v", "--verbose", action="store_true", help="print compile errors in full")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("aot_check: unset TRITON_INTERPRET (kernels would be defined for the interpreter)", file=sys.stderr)
        return 2
    kernels = [k.strip() for k in args.kernels.split(",") if k.strip()]
    unknown = sorted(set(kernels) - set(_FAMILIES))
    if unknown:
        p.error(f"--kernels: unknown {unknown}, expected some of {list(_FAMILIES)}")
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    failures = _compile_all(args.arch, dtypes, kernels, args.verbose)
    print(f"{failures} variant(s) failed to compile" if failures else "all variants compiled")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
