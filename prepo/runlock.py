"""One writer per run directory. Two ``prepo.train`` processes on one ``output_dir`` (say, a harness
restarted while its old trainer lived on) would interleave their rows in metrics.jsonl and race on
the checkpoint; the second one stops at once instead. The lock is an ``flock`` on
``<output_dir>/.lock``, so the kernel drops it when its process dies, however it dies."""
from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import RunDirError

LOCK = ".lock"


@contextmanager
def run_lock(out_dir: Path) -> Iterator[None]:
    """Hold ``out_dir``'s lock for the block; RunDirError (naming the holder's pid) when it is held."""
    path = Path(out_dir) / LOCK
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            raise RunDirError(f"output_dir {str(out_dir)!r} is in use by another prepo.train (pid {holder}); "
                              "two writers would interleave its logs and checkpoints: wait for it, stop it, "
                              "or choose another output_dir") from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
