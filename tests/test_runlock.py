"""One writer per run directory (prepo/runlock.py): a second trainer on a directory in use stops at
once, naming the process that holds it; the lock goes with its holder."""
import subprocess
import sys

import pytest

from prepo.errors import RunDirError
from prepo.runlock import run_lock
from trainer_harness import REPO, TINY, cmd, env

HOLD = "import sys, time; from prepo.runlock import run_lock\nwith run_lock(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(120)\n"


def test_a_second_trainer_on_a_directory_in_use_stops_and_names_the_holder(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], cwd=REPO, env=env(),
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        res = subprocess.run(cmd({**TINY, "total_steps": 1, "output_dir": tmp_path}), cwd=REPO, env=env(),
                             capture_output=True, text=True, timeout=120)
        assert res.returncode != 0
        assert f"is in use by another prepo.train (pid {holder.pid})" in res.stderr, res.stderr[-2000:]
        assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "config.yaml").exists()
    finally:
        holder.kill()
        holder.wait()
    with run_lock(tmp_path):   # the kernel dropped the killed holder's lock
        pass


def test_the_lock_is_released_after_the_block_and_held_within_it(tmp_path):
    with run_lock(tmp_path):
        with pytest.raises(RunDirError, match="in use by another prepo.train"):
            with run_lock(tmp_path):
                pass
    with run_lock(tmp_path):
        pass
