"""What the kernel benchmarks share: their inputs (:func:`make_case`, the one input builder of
``bench_logprob_entropy.py``, ``bench_grpo_loss.py`` and ``gpu_suite.py``) and, for the log-prob /
entropy ones, the peers they compare (one name each).

Each peer ``make(name, device, params)`` gives ``(fn, computes)``: ``fn(hidden, weight, targets) ->
(logprob [N] fp32, entropy [N] or None)`` and a note on what it computes; it raises
:class:`Unavailable` (saying why) when the peer cannot run on that device here.

``build(name, mode, case)`` turns a peer or a floor into ``run() -> None`` for a mode:
    "fwd"     forward only, no autograd (prompt-perplexity scoring)
    "fwdbwd"  forward, then backward with the case's upstream gradients (training)
Floors ("matmul_*") do only the matmuls a design cannot avoid; they give the ratios meaning.

prepo_kernels is imported only when a prepo peer is made.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

TARGET_ENTROPY = 1.5  # nats, mean token entropy of a trained model
Forward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple]


class Unavailable(Exception):
    """A peer cannot run here; the message says why."""


@dataclass
class Case:
    hidden: torch.Tensor  # [N, D]
    weight: torch.Tensor  # [V, D]
    targets: torch.Tensor  # [N]
    grad_logprob: torch.Tensor  # [N] fp32, zero on GRPO-skipped rows
    grad_entropy: torch.Tensor  # [N] fp32
    ref_logprob: Optional[torch.Tensor] = None  # [N] fp32 log-prob of the targets (fp32 logits of the rounded inputs)
    mean_entropy: Optional[float] = None        # nats, of those logits (sampled targets only)


def calibrate_scale(h_rows: torch.Tensor, w0: torch.Tensor, target_entropy: float) -> tuple[float, float]:
    """Scale s such that the mean entropy of softmax(s * h_rows @ w0.T) is ``target_entropy`` nats
    (bisection in log s; the entropy falls as s grows). Returns (s, the entropy reached)."""
    z0 = h_rows.float() @ w0.float().T

    def entropy(scale: float) -> float:
        logp = torch.log_softmax(z0 * scale, dim=-1)
        return float(-(logp.exp() * logp).sum(-1).mean())

    lo, hi = math.log(1e-3), math.log(1e3)
    for _ in range(50):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if entropy(math.exp(mid)) > target_entropy else (lo, mid)
    scale = math.exp(0.5 * (lo + hi))
    return scale, entropy(scale)


def make_case(n: int, d: int, vocab: int, dtype: torch.dtype, zero_grad_frac: float, seed: int = 0, *,
              device="cpu", target_entropy: float = TARGET_ENTROPY, sample_targets: bool = False) -> Case:
    """Random inputs on ``device`` with the weight scaled so the mean token entropy is about
    ``target_entropy`` nats. Targets are uniform, or with ``sample_targets`` drawn from the model's
    own distribution, as in RL rollouts (then ``ref_logprob`` and ``mean_entropy`` are filled in).
    Rows with zero upstream gradient (about ``zero_grad_frac`` of them) come in contiguous blocks of
    64, like whole zero-advantage groups."""
    gen = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(n, d, generator=gen, device=device).to(dtype)
    weight = torch.randn(vocab, d, generator=gen, device=device).div_(math.sqrt(d))
    scale, _ = calibrate_scale(hidden[: min(n, 256)], weight, target_entropy)
    weight = weight.mul_(scale).to(dtype)
    ref_logprob = mean_entropy = None
    if sample_targets:
        targets, ref_logprob, mean_entropy = _sampled_targets(hidden, weight, gen)
    else:
        targets = torch.randint(0, vocab, (n,), generator=gen, device=device)
    grad_logprob = torch.randn(n, generator=gen, device=device) / n
    grad_entropy = torch.randn(n, generator=gen, device=device) / n
    zero = zero_blocks(n, zero_grad_frac, gen)
    grad_logprob[zero] = 0
    grad_entropy[zero] = 0
    return Case(hidden, weight, targets, grad_logprob, grad_entropy, ref_logprob, mean_entropy)


def zero_blocks(n: int, frac: float, gen: torch.Generator, block: int = 64) -> torch.Tensor:
    """[n] bool on ``gen``'s device: whole blocks of ``block`` rows, each True with probability
    ``frac`` (the rows of zero-advantage groups, which get no upstream gradient)."""
    zero = torch.zeros(n, dtype=torch.bool, device=gen.device)
    for start in range(0, n, block):
        zero[start : start + block] = torch.rand((), generator=gen, device=gen.device) < frac
    return zero


def _sampled_targets(hidden: torch.Tensor, weight: torch.Tensor, gen: torch.Generator) -> tuple:
    """(targets [N] drawn from softmax(h W^T), their fp32 log-probs [N], the mean entropy in nats),
    from fp32 logits of the rounded inputs, in row chunks of at most 2^28 bytes of logits."""
    n, vocab = hidden.shape[0], weight.shape[0]
    targets = torch.empty(n, dtype=torch.long, device=hidden.device)
    logprob = torch.empty(n, dtype=torch.float32, device=hidden.device)
    entropy_sum, wf = 0.0, weight.float()
    chunk = max(1, min(n, (1 << 28) // (4 * vocab)))
    for i in range(0, n, chunk):
        logp = torch.log_softmax(hidden[i : i + chunk].float() @ wf.T, dim=-1)
        targets[i : i + chunk] = torch.multinomial(logp.exp(), 1, generator=gen).squeeze(-1)
        logprob[i : i + chunk] = logp.gather(-1, targets[i : i + chunk, None]).squeeze(-1)
        entropy_sum += float(-(logp.exp() * logp).sum())
        del logp
    return targets, logprob, entropy_sum / n


def grpo_inputs(case: Case, seed: int = 1, spread: float = 0.15) -> tuple[torch.Tensor, torch.Tensor]:
    """(old log-probs [N], advantages [N]) for a GRPO loss on ``case``: the old log-probs a little
    off the current ones (``spread`` nats of noise: ratios of about exp(+-2 spread), so both clip
    sides occur), the advantages standard normal, 0 on the rows with no upstream gradient."""
    current = case.ref_logprob
    if current is None:   # the fused op: no [N, V] logits (the CPU benchmarks measure peak memory)
        from prepo_kernels import linear_logprob_entropy

        with torch.no_grad():
            current, _ = linear_logprob_entropy(case.hidden, case.weight, case.targets, compute_entropy=False)
    gen = torch.Generator(device=case.hidden.device).manual_seed(seed)
    n, dev = case.targets.shape[0], case.hidden.device
    old = current - spread * torch.randn(n, generator=gen, device=dev)
    adv = torch.where(case.grad_logprob != 0, torch.randn(n, generator=gen, device=dev), 0)
    return old, adv


# --- peers: make(device, params) -> (fn, computes) or raise Unavailable --------------------------------


def naive(h, w, y):
    """bf16 matmul -> fp32 log_softmax -> gather; entropy = -sum p log p (the [N, V] logits in memory)."""
    logp = torch.log_softmax((h @ w.T).float(), dim=-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return logp.gather(1, y[:, None]).squeeze(1), entropy


def _naive(device, params):
    return naive, "logprob+entropy"


def _naive_compiled(device, params):
    if device.type != "cuda":
        raise Unavailable("torch.compile(naive) is measured on CUDA only (minutes of Inductor on a small CPU)")
    return torch.compile(naive, dynamic=False), "logprob+entropy"


def _torch_linear_ce(device, params):
    lce = getattr(torch.nn.functional, "linear_cross_entropy", None)
    if lce is None:
        raise Unavailable("torch.nn.functional.linear_cross_entropy does not exist in this torch")

    def fn(h, w, y):
        return -lce(h, w, y, reduction="none").float(), None

    return fn, "logprob only"


def _liger(device, params):
    try:
        import liger_kernel  # noqa: F401
    except ImportError as exc:
        raise Unavailable(f"liger_kernel is not installed ({exc})")
    try:
        from liger_kernel.ops import fused_linear_scaled_cross_entropy as scaled
    except ImportError:
        return _liger_logprob_only()
    # the dispatcher picks a CuTe-DSL kernel on sm_90 and a chunked PyTorch fallback elsewhere;
    # resolve it now so a missing CuTe DSL shows up as a note instead of a failed row
    via = "LigerFusedLinearScaledCrossEntropyFunction"
    fallback = scaled._FusedLinearPPOFallbackFunction
    try:
        impl = scaled._resolve_implementation(device)
    except Exception as exc:  # noqa: BLE001 - e.g. cutlass DSL not installed
        impl = fallback
        via += f", chunked fallback ({type(exc).__name__}: {str(exc)[:80]})"
    else:
        if impl is fallback:
            via += ", chunked PyTorch fallback"

    def fn(h, w, y):
        if impl is fallback:
            nll, ent = impl.apply(h, w, y, 1.0, -100, True)
        else:  # apply(_input, weight, target, temperature, ignore_index, m_tiles_per_cluster, return_entropy)
            nll, ent = scaled.LigerFusedLinearScaledCrossEntropyFunction.apply(h, w, y, 1.0, -100, 1, True)
        return -nll.float(), ent.float()

    return fn, f"logprob+entropy ({via})"


def _liger_logprob_only():
    try:
        from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction as G
    except ImportError as exc:
        raise Unavailable(f"no fused linear cross-entropy in this liger_kernel ({exc})")

    def fn(h, w, y):
        out = G.apply(h, w, y, None, None, -100, 0.0, 0.0, "none")
        loss = out[0] if isinstance(out, tuple) else out
        return -loss.float(), None

    return fn, "logprob only (LigerFusedLinearCrossEntropyFunction, no entropy API)"


def _cce(device, params):
    try:
        from cut_cross_entropy import linear_cross_entropy
    except ImportError as exc:
        raise Unavailable(f"cut_cross_entropy is not installed ({exc})")
    impl = "cce" if device.type == "cuda" else "torch_compile"  # its Triton kernels need CUDA

    def fn(h, w, y):
        return -linear_cross_entropy(h, w, y, impl=impl, reduction="none").float(), None

    return fn, f"logprob only (impl={impl})"


def _trl(device, params):
    try:
        from trl.trainer.utils import selective_log_softmax_and_entropy
    except ImportError as exc:
        raise Unavailable(f"trl is not installed ({exc})")

    def fn(h, w, y):
        return selective_log_softmax_and_entropy(h @ w.T, y)

    # TRL's GRPO path: the model's logits in memory, then its one-pass log-prob + entropy (a Triton
    # kernel on CUDA, row-chunked PyTorch elsewhere)
    return fn, "logprob+entropy (h @ W.T, then trl's selective_log_softmax_and_entropy)"


def _prepo(impl: str):
    def make(device, params):
        from prepo_kernels import linear_logprob_entropy
        from prepo_kernels.backends import registry

        why = registry.unavailable_reason(impl, device)
        if why is not None:
            raise Unavailable(why)

        def fn(h, w, y):
            return linear_logprob_entropy(h, w, y, impl=impl, params=params)

        return fn, "logprob+entropy"

    return make


# name -> maker; the names both benchmark scripts print and accept
PEERS = {
    "naive": _naive,
    "naive_compiled": _naive_compiled,
    "torch_linear_ce": _torch_linear_ce,
    "cce": _cce,
    "liger": _liger,
    "trl": _trl,
    "prepo_torch": _prepo("torch"),
    "prepo_cpu": _prepo("cpu"),
    "prepo_triton": _prepo("triton"),
    "prepo_cuda": _prepo("cuda"),
}
FUSED = tuple(PEERS)


def make(name: str, device, params=None) -> tuple[Forward, str]:
    """(fn, computes) for peer ``name`` on ``device``; raises Unavailable. ``params``: prepo's
    KernelParams (None: defaults)."""
    return PEERS[name](torch.device(device), params)


FLOORS = {"fwd": ("matmul_1",), "fwdbwd": ("matmul_3", "matmul_4")}


def unavailable(name: str, device="cpu") -> Optional[str]:
    """None when ``name`` (a peer or a floor) can run on ``device``, else why not."""
    if name not in PEERS:
        return None
    try:
        make(name, device)
    except Unavailable as exc:
        return str(exc)
    return None


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
    fn, _ = make(name, case.hidden.device)
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
