"""PREPO's signals: what the policy already knows about a prompt or a rollout, and how the
trainer acts on it. Nothing here imports the trainer's config, tasks or rollout engines, so the
integrations (TRL, verl) use these parts alone.

* :mod:`.scoring`: prompt perplexity under the current policy (fused kernel);
* :mod:`.pacing`: the curriculum position ``rho`` and the perplexity window;
* :mod:`.weighting`: relative-entropy rollout weights ``w_i = H_i / H_bar``;
* :mod:`.greso`: GRESO's pre-rollout filter state;
* :mod:`.strategies`: the selection strategies, one object each, in one registry.
"""
from .greso import Greso, GresoParams
from .pacing import PACINGS, pacing_rho, window_select, window_start
from .scoring import prompt_perplexity
from .strategies import STRATEGIES, Strategy, get_strategy
from .weighting import relative_entropy_weights

__all__ = ["Greso", "GresoParams", "PACINGS", "STRATEGIES", "Strategy", "get_strategy", "pacing_rho",
           "prompt_perplexity", "relative_entropy_weights", "window_select", "window_start"]
