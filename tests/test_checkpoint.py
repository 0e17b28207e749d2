"""prepo.checkpoint's atomic write: all or nothing, and a failed write says why."""
import os

import pytest
import torch

from prepo import checkpoint as ckpt


def test_round_trip(tmp_path):
    state = {"step": 3, "w": torch.randn(4, 5, dtype=torch.float64)}
    ckpt.save_checkpoint(tmp_path, state)
    back = ckpt.load_checkpoint(tmp_path)
    assert back["step"] == 3 and torch.equal(back["w"], state["w"])
    assert os.listdir(tmp_path) == [ckpt.LAST]


def test_failed_write_keeps_the_old_file_and_names_the_disk(tmp_path, monkeypatch):
    """A write that dies half way (here: like a full disk) leaves the previous checkpoint readable, no temp
    file, and an error that names the path and the free space instead of torch's "unexpected pos"."""
    ckpt.save_checkpoint(tmp_path, {"step": 1})

    def torn_save(obj, f):
        f.write(b"PK\x03\x04 half a zip")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 77902208 vs 77902100")

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(OSError, match=r"last\.pt failed with [\d.]+ GiB free on its disk.*unexpected pos"):
        ckpt.save_checkpoint(tmp_path, {"step": 2})
    monkeypatch.undo()
    assert os.listdir(tmp_path) == [ckpt.LAST] and ckpt.load_checkpoint(tmp_path)["step"] == 1


def test_interrupt_is_not_rewrapped(tmp_path, monkeypatch):
    def interrupted(obj, f):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(tmp_path, {"step": 1})
    assert os.listdir(tmp_path) == []
