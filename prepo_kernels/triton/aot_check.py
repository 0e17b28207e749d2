"""Compile every kernel variant ahead of time for a CUDA target, no GPU needed.

    python -m prepo_kernels.triton.aot_check [--arch 90] [--dtypes bf16,fp16,fp32,fp64]

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


def _compile_all(arch: int, dtypes: list[str], verbose: bool) -> int:
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from . import config
    from .backward_dh import _backward_dh_kernel
    from .backward_dw import _backward_dw_kernel
    from .backward_fused import _backward_fused_kernel
    from .forward import _forward_kernel
    from .merge import _merge_kernel

    target = GPUTarget("cuda", arch, 32)
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}
    failures = 0

    def compile_one(kernel, names, types, consts, blocks, label):
        nonlocal failures
        sig = dict(zip(names, types))
        sig.update({k: "constexpr" for k in consts})
        # what the JIT does for pointers and for ints divisible by 16 (D, V, n at real shapes)
        attrs = {(i,): [["tt.divisibility", 16]] for i, (k, v) in enumerate(sig.items())
                 if v.startswith("*") or k in ("n", "V", "D", "v_per_split")}
        src = ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=attrs)
        try:
            k = triton.compile(src, target=target,
                               options={"num_warps": blocks.num_warps, "num_stages": blocks.num_stages})
        except Exception as exc:  # noqa: BLE001
            failures += 1
            print(f"FAIL {label}: {type(exc).__name__}: {str(exc)[:1500]}", flush=True)
            return
        usage = ""
        if cuobjdump.exists():
            with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                f.write(k.asm["cubin"])
                f.flush()
                out = subprocess.run([str(cuobjdump), "-res-usage", f.name], capture_output=True, text=True).stdout
            m = re.search(r"REG:(\d+)\s+STACK:(\d+)", out)
            if m:
                usage = f"regs {m.group(1)}, stack {m.group(2)} B"
        print(f"ok   {label}: {usage} smem {k.metadata.shared} B", flush=True)

    for name in dtypes:
        dt = torch_dtype[name]
        ptr = "*" + name
        acc = "*fp64" if dt == torch.float64 else "*fp32"
        common_flags = dict(IS_FP64=dt == torch.float64, PRECISION="ieee", UPCAST=False)
        n, V, D = 8192, 131072, 4096
        # forward + merge
        fb = config.forward_blocks(n, V, D, dt)
        names = ["h_ptr", "w_ptr", "b_ptr", "y_ptr", "it_ptr", "logprob_ptr", "ent_ptr", "lse_ptr",
                 "pm_ptr", "ps_ptr", "pt_ptr", "pzy_ptr", "n", "V", "D", "v_per_split"]
        types = [ptr, ptr, ptr, "*i64"] + [acc] * 8 + ["i32"] * 4
        for has_bias, ent, split in ((True, True, True), (False, True, False), (False, False, True)):
            consts = dict(HAS_BIAS=has_bias, COMPUTE_ENTROPY=ent, SPLIT=split, **common_flags,
                          BLOCK_N=fb.BLOCK_N, BLOCK_V=fb.BLOCK_V, BLOCK_D=fb.BLOCK_D)
            compile_one(_forward_kernel, names, types, consts, fb,
                        f"forward {name} bias={has_bias} entropy={ent} split={split} {fb}")
        mb = config.Blocks(128, 0, 0, num_warps=4, num_stages=1)
        compile_one(_merge_kernel, ["pm_ptr", "ps_ptr", "pt_ptr", "pzy_ptr", "logprob_ptr", "ent_ptr", "lse_ptr",
                                    "n", "num_splits"], [acc] * 7 + ["i32", "i32"],
                    dict(COMPUTE_ENTROPY=True, BLOCK=128), mb, f"merge {name}")
        # backward
        base_names = ["h_ptr", "w_ptr", "b_ptr", "y_ptr", "it_ptr", "lse_ptr", "ent_ptr", "g_ptr", "e_ptr"]
        base_types = [ptr, ptr, ptr, "*i64"] + [acc] * 5
        filt = dt in (torch.bfloat16, torch.float16)
        for has_bias, has_e in ((True, True), (False, False)):
            for det in (False, True):
                bb = config.backward_blocks(n, V, D, dt, det)
                consts = dict(HAS_BIAS=has_bias, HAS_E=has_e, FILTER=filt, **common_flags,
                              BLOCK_N=bb.BLOCK_N, BLOCK_V=bb.BLOCK_V, BLOCK_D=bb.BLOCK_D)
                tag = f"{name} bias={has_bias} e={has_e} filter={filt} {bb}"
                if det:
                    compile_one(_backward_dh_kernel, base_names + ["dh_ptr", "n", "V", "D", "filter_budget"],
                                base_types + [acc, "i32", "i32", "i32", "fp32"], consts, bb, f"backward_dh {tag}")
                    compile_one(_backward_dw_kernel, base_names + ["dw_ptr", "db_ptr", "n", "V", "D", "filter_budget"],
                                base_types + [acc, acc, "i32", "i32", "i32", "fp32"], consts, bb, f"backward_dw {tag}")
                else:
                    compile_one(_backward_fused_kernel,
                                base_names + ["dh_ptr", "dw_ptr", "db_ptr", "n", "V", "D", "filter_budget"],
                                base_types + [acc, acc, acc, "i32", "i32", "i32", "fp32"],
                                dict(consts, GROUP_N=8), bb, f"backward_fused {tag}")
    return failures


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability as an int (80, 90, ...)")
    p.add_argument("--dtypes", default="bf16,fp16,fp32,fp64")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("aot_check: unset TRITON_INTERPRET (kernels would be defined for the interpreter)", file=sys.stderr)
        return 2
    failures = _compile_all(args.arch, [d.strip() for d in args.dtypes.split(",") if d.strip()], args.verbose)
    print(f"{failures} variant(s) failed to compile" if failures else "all variants compiled")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
