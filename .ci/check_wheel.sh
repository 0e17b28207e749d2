#!/usr/bin/env bash
# CI step: the wheel and the sdist. Builds both with the active environment's torch (the extension is
# compiled against it: no build isolation), installs the wheel into a fresh venv (torch first, the
# CPU wheel), and from a directory outside the source tree checks that the package is the installed
# one, carries the compiled CPU backend, and that the ops match the float64 reference.
#   PREPO_WHEEL_DIR=/path   where the wheel and sdist go (default: a temp dir); an existing
#                           prepo-*.whl there is reused instead of rebuilt
set -euo pipefail
cd "$(dirname "$0")/.."
src="$PWD"
work="$(mktemp -d)"
dist="${PREPO_WHEEL_DIR:-$work/dist}"
mkdir -p "$dist"

if ! ls "$dist"/prepo-*.whl > /dev/null 2>&1; then
  # without build isolation setuptools needs the `wheel` package in the active environment for
  # bdist_wheel, and the test extras do not always bring it
  python -m pip install -q wheel
  MAX_JOBS="${MAX_JOBS:-2}" python -m pip wheel -q --no-build-isolation --no-deps . -w "$dist"
fi
python setup.py -q sdist -d "$dist" > /dev/null 2>&1
wheel="$(ls "$dist"/prepo-*.whl | head -1)"
sdist="$(ls "$dist"/prepo-*.tar.gz | head -1)"
python - "$wheel" "$sdist" <<'PY'
import sys, tarfile, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
assert any(n.startswith("prepo_kernels/_C") and n.endswith(".so") for n in names), f"no compiled extension in {sys.argv[1]}"
assert any(n.endswith("entry_points.txt") for n in names) and not any(n.startswith(("tests/", "benchmarks/")) for n in names)
members = tarfile.open(sys.argv[2]).getnames()
for need in ("csrc/ops.cpp", "csrc/lle_driver.h", "csrc/cpu/lle_cpu.cpp", "csrc/cuda/lle_cuda.cu", "LICENSE"):
    assert any(m.endswith(need) for m in members), f"{need} missing from the sdist"
print("wheel", sys.argv[1].rsplit("/", 1)[1], "and sdist hold the extension / its sources")
PY

python3 -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q torch==2.13.0
"$work/venv/bin/python" -m pip install -q "$wheel"
cd "$work"   # outside the source tree: nothing of it is importable from here
"$work/venv/bin/prepo" --help > /dev/null
"$work/venv/bin/python" - "$src" <<'PY'
import sys
from pathlib import Path

import torch

import prepo
import prepo_kernels as pk
from prepo_kernels import linear_grpo_loss, linear_logprob_entropy

src = Path(sys.argv[1])
for mod in (pk, prepo):
    assert src not in Path(mod.__file__).resolve().parents, f"{mod.__name__} imported from the source tree"
assert "cpu" in pk.available_impls("cpu"), pk.available_impls("cpu")
torch.manual_seed(0)
n, d, v = 37, 24, 1000            # a vocabulary that is no multiple of a tile
h = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
w = torch.randn(v, d, dtype=torch.float64, requires_grad=True)
y = torch.randint(0, v, (n,)); y[3] = -100
out = {}
for impl in ("reference", "cpu"):
    lp, ent = linear_logprob_entropy(h, w, y, temperature=0.7, impl=impl)
    gh, gw = torch.autograd.grad((lp * 0.3 + ent * 0.2).sum(), (h, w))
    out[impl] = (lp, ent, gh, gw)
for a, b in zip(out["reference"], out["cpu"]):
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
old = out["reference"][0].detach() - 0.1 * torch.rand(n, dtype=torch.float64)
adv = torch.randn(n, dtype=torch.float64)
losses = [linear_grpo_loss(h, w, y, old, adv, temperature=0.7, impl=impl)[0] for impl in ("reference", "cpu")]
torch.testing.assert_close(losses[0], losses[1], rtol=1e-9, atol=1e-9)
print(f"prepo_kernels {pk.__version__} from {Path(pk.__file__).parent}: backends {pk.available_impls('cpu')}, "
      "cpu == reference (float64, values and gradients)")
PY
rm -rf "$work"
