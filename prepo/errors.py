"""Errors in what the user gave the trainer, each with a message that says what is wrong and what
would work. The command line prints a :class:`UserError`'s message and exits with status 2; every
other exception is a bug and keeps its traceback."""
from __future__ import annotations


class UserError(ValueError):
    """Input the run cannot use: an option, data, a reward function, a model, the run directory."""


class ConfigError(UserError):
    """An option (or a combination of options) that cannot run here; the message says what is valid."""


class DataError(UserError):
    """Problem data that cannot be used (bad file, missing field, wrong answer type...)."""


class RewardError(UserError):
    """A reward function that cannot be loaded (bad spec, missing module or function)."""


class ModelError(UserError):
    """A model that cannot be loaded or used (missing, corrupt, no EOS token, no chat template...)."""


class RunDirError(UserError):
    """An output directory that cannot be used as asked: in use by another run, or a checkpoint that
    this launch cannot resume."""
