#!/usr/bin/env bash
# The one device call (issue 23): run tools/gpu_all.py on the GPU machine, with the wheels the
# image lacks when they were carried. Here, first: python tools/gpu_all.py --fetch-wheels
# Device tool: command 'bash tools/gpu_all.sh', carry ['.whl'], timeout_s 540 (budget 420 s + slack).
# Arguments go to gpu_all.py (--budget-s, --parts, ...); it always exits 0 after writing summary.md.
set -u
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if compgen -G ".whl/*.whl" > /dev/null; then
  if "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/prepo-site .whl/*.whl; then
    export PYTHONPATH="/tmp/prepo-site${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "gpu_all.sh: installing .whl/ failed; going on without those packages" >&2
  fi
fi
exec "$PYTHON" tools/gpu_all.py "$@"
