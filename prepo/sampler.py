"""Candidate batches of training prompts, drawn without replacement."""
from __future__ import annotations

import numpy as np

from .errors import DataError, RunDirError


class PromptSampler:
    """Candidate batches drawn without replacement from a reshuffled permutation each epoch.
    Its whole state is (epoch, cursor): deterministic given the seed, cheap to checkpoint."""

    def __init__(self, num_items: int, seed: int):
        if num_items < 1:
            raise DataError("the training set is empty")
        self.num_items = num_items
        self.seed = seed
        self.epoch = 0
        self.cursor = 0
        self._perm = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch, 7919]).permutation(self.num_items)

    def next_batch(self, size: int) -> list[int]:
        out: list[int] = []
        while len(out) < size:
            if self.cursor >= self.num_items:
                self.epoch += 1
                self.cursor = 0
                self._perm = self._permutation(self.epoch)
            take = min(size - len(out), self.num_items - self.cursor)
            out += self._perm[self.cursor : self.cursor + take].tolist()
            self.cursor += take
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "num_items": self.num_items, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state["num_items"] != self.num_items or state["seed"] != self.seed:
            raise RunDirError("the checkpoint's prompt sampler is for a different data set or seed: resume with the data and seed it was made with")
        self.epoch, self.cursor = state["epoch"], state["cursor"]
        self._perm = self._permutation(self.epoch)
