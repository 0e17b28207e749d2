#!/usr/bin/env bash
# Compile every csrc/cuda/*.cu with nvcc for sm_90 against the installed torch's headers (no GPU
# needed, nothing is linked or run). Prints one line per file; exits non-zero if any file fails
# (or if nvcc / torch is missing).
#   NVCC=/path/to/nvcc   CUDA_ARCH=sm_90   CUDA_STD=c++17|c++20   PYTHON=python
set -u
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python}"
NVCC="${NVCC:-$(command -v nvcc || true)}"
ARCH="${CUDA_ARCH:-sm_90}"
if [ -z "$NVCC" ]; then
  echo "check_cuda_compile: nvcc not found (set NVCC=...)" >&2
  exit 2
fi

# torch's include dirs, and the C++ standard its headers are written for (torch >= 2.10 needs C++20)
TORCH_INFO="$("$PYTHON" - <<'PY'
import torch
from torch.utils.cpp_extension import include_paths
major, minor = (int(x) for x in torch.__version__.split(".")[:2])
print("c++20" if (major, minor) >= (2, 10) else "c++17")
print(int(torch._C._GLIBCXX_USE_CXX11_ABI))
for p in include_paths():
    print(p)
PY
)" || { echo "check_cuda_compile: cannot import torch with $PYTHON" >&2; exit 2; }

STD="${CUDA_STD:-$(echo "$TORCH_INFO" | sed -n 1p)}"
ABI="$(echo "$TORCH_INFO" | sed -n 2p)"
INCLUDES=()
while IFS= read -r p; do
  [ -n "$p" ] && INCLUDES+=("-I$p")
done < <(echo "$TORCH_INFO" | sed -n '3,$p')
PY_INCLUDE="$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"

OUT_DIR="$(mktemp -d /tmp/prepo_cuda_check.XXXXXX)"
trap 'rm -rf "$OUT_DIR"' EXIT

shopt -s nullglob
files=(csrc/cuda/*.cu)
if [ ${#files[@]} -eq 0 ]; then
  echo "check_cuda_compile: no csrc/cuda/*.cu files" >&2
  exit 1
fi

status=0
for f in "${files[@]}"; do
  obj="$OUT_DIR/$(basename "${f%.cu}").o"
  log="$OUT_DIR/$(basename "${f%.cu}").log"
  if "$NVCC" -arch="$ARCH" -std="$STD" -O2 -c "$f" -o "$obj" \
      "${INCLUDES[@]}" "-I$PY_INCLUDE" \
      -DTORCH_API_INCLUDE_EXTENSION_H -DTORCH_EXTENSION_NAME=_C -D_GLIBCXX_USE_CXX11_ABI="$ABI" \
      -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ \
      -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr -Xcompiler -fPIC \
      >"$log" 2>&1; then
    echo "ok    $f (nvcc -arch=$ARCH -std=$STD)"
  else
    echo "FAIL  $f (nvcc -arch=$ARCH -std=$STD)"
    sed 's/^/      /' "$log" | grep -v "Wc++20-extensions\|^ *| \|^ *\^" | head -40
    status=1
  fi
done
exit $status
