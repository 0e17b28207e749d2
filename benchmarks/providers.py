"""What the log-prob/entropy benchmarks compare: each provider turns a Case into a callable.

A provider returns ``run() -> None`` for a mode:
    "fwd"     forward only, no autograd (prompt-perplexity scoring)
    "fwdbwd"  forward, then backward with the case's upstream gradients (training)
Floors ("matmul_*") do only the matmuls a design cannot avoid; they give the ratios meaning.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

import prepo_kernels

TARGET_ENTROPY = 1.5  # nats, mean token entropy of a trained model


@dataclass
class Case:
    hidden: torch.Tensor  # [N, D]
    weight: torch.Tensor  # [V, D]
    targets: torch.Tensor  # [N]
    grad_logprob: torch.Tensor  # [N] fp32, zero on GRPO-skipped rows
    grad_entropy: torch.Tensor  # [N] fp32


def _mean_entropy(hidden: torch.Tensor, weight: torch.Tensor, scale: float) -> float:
    logits = (hidden.float() @ weight.float().T) * scale
    return torch.distributions.Categorical(logits=logits).entropy().mean().item()


def make_case(n: int, d: int, vocab: int, dtype: torch.dtype, zero_grad_frac: float, seed: int = 0) -> Case:
    """Random inputs with the weight scaled so the mean token entropy is about TARGET_ENTROPY.
    Rows with zero upstream gradient come in contiguous blocks, like whole zero-advantage groups."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=gen).to(dtype)
    weight = torch.randn(vocab, d, generator=gen).div_(math.sqrt(d)).to(dtype)
    sample = hidden[: min(n, 64)]
    lo, hi = 0.1, 100.0
    for _ in range(25):  # bisect the scale on log axis; entropy falls as the scale grows
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if _mean_entropy(sample, weight, mid) > TARGET_ENTROPY else (lo, mid)
    weight.mul_(math.sqrt(lo * hi))
    targets = torch.randint(0, vocab, (n,), generator=gen)
    grad_logprob = torch.randn(n, generator=gen) / n
    grad_entropy = torch.randn(n, generator=gen) / n
    zero = torch.zeros(n, dtype=torch.bool)
    block = 64
    for start in range(0, n, block):
        zero[start : start + block] = torch.rand((), generator=gen) < zero_grad_frac
    grad_logprob[zero] = 0
    grad_entropy[zero] = 0
    return Case(hidden, weight, targets, grad_logprob, grad_entropy)


# --- forward functions: (hidden, weight, targets) -> (logprob, entropy or None) --------------------


def naive(h, w, y):
    logp = torch.log_softmax((h @ w.T).float(), dim=-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return logp.gather(1, y[:, None]).squeeze(1), entropy


def torch_linear_cross_entropy(h, w, y):
    return -torch.nn.functional.linear_cross_entropy(h, w, y, reduction="none"), None


def cut_cross_entropy(h, w, y):
    from cut_cross_entropy import linear_cross_entropy

    return -linear_cross_entropy(h, w, y, impl="torch_compile", reduction="none"), None


def liger(h, w, y):
    from liger_kernel.ops.fused_linear_scaled_cross_entropy import LigerFusedLinearScaledCrossEntropyFunction

    nll, entropy = LigerFusedLinearScaledCrossEntropyFunction.apply(h, w, y, 1.0, -100, 1, True)
    return -nll, entropy


def prepo(impl: str):
    def fn(h, w, y):
        return prepo_kernels.linear_logprob_entropy(h, w, y, impl=impl)

    return fn


def _importable(module: str) -> Optional[str]:
    try:
        __import__(module)
    except ImportError as exc:
        return f"not installed ({exc})"
    return None


def _torch_lce_missing() -> Optional[str]:
    ok = hasattr(torch.nn.functional, "linear_cross_entropy")
    return None if ok else "torch.nn.functional.linear_cross_entropy not in this torch"


def _prepo_missing(impl: str) -> Callable[[], Optional[str]]:
    return lambda: prepo_kernels.backends.registry.unavailable_reason(impl, torch.device("cpu"))


# name -> (forward fn, reason-it-cannot-run check)
FUSED = {
    "naive": (naive, lambda: None),
    "torch_linear_ce": (torch_linear_cross_entropy, _torch_lce_missing),
    "cce_torch_compile": (cut_cross_entropy, lambda: _importable("cut_cross_entropy")),
    "liger_scaled_ce": (liger, lambda: _importable("liger_kernel")),
    "prepo_torch": (prepo("torch"), _prepo_missing("torch")),
    "prepo_cpu": (prepo("cpu"), _prepo_missing("cpu")),
}
FLOORS = {"fwd": ("matmul_1",), "fwdbwd": ("matmul_3", "matmul_4")}


def unavailable(name: str) -> Optional[str]:
    return FUSED[name][1]() if name in FUSED else None


def _floor(case: Case, n_matmuls: int) -> Callable[[], None]:
    h, w = case.hidden, case.weight

    def run():
        grad_logits = h @ w.T  # stands in for dL/dz, same shape and dtype
        if n_matmuls >= 4:
            grad_logits = h @ w.T  # the recompute of a logits-free design
        if n_matmuls >= 2:
            _ = grad_logits @ w
            _ = grad_logits.T @ h

    return run


def build(name: str, mode: str, case: Case) -> Callable[[], None]:
    if name.startswith("matmul_"):
        return _floor(case, int(name.split("_")[1]))
    fn = FUSED[name][0]
    if mode == "fwd":

        def run_fwd():
            with torch.no_grad():
                fn(case.hidden, case.weight, case.targets)

        return run_fwd

    def run_fwdbwd():
        h = case.hidden.detach().requires_grad_()
        w = case.weight.detach().requires_grad_()
        logprob, entropy = fn(h, w, case.targets)
        outputs, grads = [logprob], [case.grad_logprob]
        if entropy is not None:
            outputs.append(entropy)
            grads.append(case.grad_entropy)
        torch.autograd.backward(outputs, grads)

    return run_fwdbwd
