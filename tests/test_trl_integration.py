"""prepo.integrations.trl on CPU with a tiny random Qwen2 and the real Qwen tokenizer: training runs,
the window, the weights, the fused log-probs, the switches and resume, against independent
references (full-logits float64 perplexities and entropies)."""
import math

import numpy as np
import pytest
import torch

pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
pytestmark = pytest.mark.slow   # each test trains or builds a TRL trainer: seconds to minutes on 2 cores

from prepo.integrations.trl import PrepoGRPOConfig, PrepoGRPOTrainer  # noqa: E402

N_PROMPTS, G, K, M = 20, 2, 2, 5  # |B| = M*K = 10 candidates, K = 2 prompts rolled out, G completions each
WORDS = ["seven plus two", "the capital of France", "integrate x squared", "a prime above ninety",
         "sort these letters", "one", "what is the derivative of sine", "name a colour"]


def prompt_dataset():
    texts = [f"{WORDS[i % len(WORDS)]} ({i})" + " please" * (i % 4) for i in range(N_PROMPTS)]
    return datasets.Dataset.from_dict({"prompt": [[{"role": "user", "content": t}] for t in texts],
                                       "uid": list(range(N_PROMPTS))})


def reward_chars(completions, **kwargs):
    return [float(len(c[0]["content"]) % 7) for c in completions]


def make_config(tmp_path, **overrides):
    kw = dict(output_dir=str(tmp_path), per_device_train_batch_size=G * K, num_generations=G,
              max_completion_length=4, max_steps=3, learning_rate=1e-3, logging_steps=1, save_strategy="no",
              report_to="none", use_cpu=True, seed=0, prepo_candidate_multiple=M, temperature=0.9,
              dataloader_num_workers=0, bf16=False)  # CPU bf16 autocast would blur the float64 comparisons
    kw.update(overrides)
    return PrepoGRPOConfig(**kw)


class Recording(PrepoGRPOTrainer):
    """Records each selection (inputs, perplexities, rho, rows out) and each weighting (advantages
    before and after, the completions)."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.selections, self.weightings, self.scores = [], [], []

    def _score_candidates(self, prompts):
        ppl = super()._score_candidates(prompts)
        self.scores.append(ppl.clone())
        return ppl

    def _select_window(self, inputs):
        rho = self.state.global_step / self.state.max_steps
        rows = super()._select_window(inputs)
        self.selections.append(dict(step=self.state.global_step, rho=rho, candidates=list(inputs), rows=rows,
                                    ppl=self.scores[-1]))
        return rows

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        if self.weightings and "advantages_out" not in self.weightings[-1]:
            self.weightings[-1]["advantages_out"] = output["advantages"].clone()
        return output

    def _rollout_weights(self, output):
        w = super()._rollout_weights(output)
        self.weightings.append(dict(output={k: v.clone() for k, v in output.items() if torch.is_tensor(v)}, w=w))
        return w


HEAD_SCALE = 40.0  # the random tiny model's logits are nearly flat; sharpen them so entropies and perplexities differ


def load_model(model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        model.lm_head.weight.mul_(HEAD_SCALE)
    return model


def make_trainer(tmp_path, model_dir, cls=Recording, **overrides):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    return cls(model=load_model(model_dir), reward_funcs=reward_chars, args=make_config(tmp_path, **overrides),
               train_dataset=prompt_dataset(), processing_class=tok)


def reference_logits(model, input_ids, mask):
    """float64 next-token logits [B, T-1, V] from the plain HF forward (positions from the mask)."""
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        hidden = model.model(input_ids=input_ids, attention_mask=mask, position_ids=pos).last_hidden_state
    return (hidden.double() @ model.lm_head.weight.double().T)[:, :-1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_qwen2_dir):
    trainer = make_trainer(tmp_path_factory.mktemp("run"), tiny_qwen2_dir)
    trainer.train()
    return trainer


def test_trains_and_logs(trained):
    logs = [h for h in trained.state.log_history if "loss" in h]
    assert len(logs) == 3 and trained.state.global_step == 3
    for h in logs:
        for key in ("prepo/ppl_window_lo", "prepo/ppl_window_hi", "prepo/weight_min", "prepo/weight_max"):
            assert math.isfinite(h[key]), key
        assert h["prepo/candidates_scored"] == M * K
        assert h["prepo/ppl_window_lo"] <= h["prepo/ppl_window_hi"]
        assert h["prepo/weight_min"] <= 1.0 <= h["prepo/weight_max"]


def test_window_follows_the_rule(trained):
    assert [s["step"] for s in trained.selections] == [0, 1, 2]
    uids_seen = set()
    for sel in trained.selections:
        ppl = sel["ppl"].numpy()
        assert len(sel["candidates"]) == M * K and len(ppl) == M * K
        order = sorted(range(M * K), key=lambda i: (ppl[i], i))  # ascending, ties by candidate order
        start = math.floor(sel["rho"] * (M * K - K))
        expected = [sel["candidates"][i]["uid"] for i in order[start : start + K]]
        assert [r["uid"] for r in sel["rows"]] == [u for u in expected for _ in range(G)]
        uids_seen |= {c["uid"] for c in sel["candidates"]}
    # the window slides: rho = 0, 1/3, 2/3 give starts 0, 2, 5
    assert [math.floor(s["rho"] * (M * K - K)) for s in trained.selections] == [0, 2, 5]
    assert len(uids_seen) == N_PROMPTS  # two candidate batches cover the data set, the third reshuffles


def test_perplexities_match_full_logits(tiny_qwen2_dir, tmp_path):
    trainer = make_trainer(tmp_path, tiny_qwen2_dir)
    prompts = [r["prompt"] for r in prompt_dataset()][:5]
    ppl = trainer._score_candidates(prompts)
    ids, _, _ = trainer._tokenize_prompts(prompts)
    for row, p in zip(ids, ppl):
        x = torch.tensor([row])
        logits = reference_logits(trainer.model, x, torch.ones_like(x))[0]
        nll = -torch.log_softmax(logits, -1).gather(-1, x[0, 1:, None]).mean()
        assert p.item() == pytest.approx(math.exp(nll.item()), rel=1e-4)


def test_weights_scale_advantages_exactly(trained):
    assert len(trained.weightings) == 3
    for rec in trained.weightings:
        before, w, after = rec["output"]["advantages"], rec["w"], rec["advantages_out"]
        assert torch.equal(after, before * w)
        cm = rec["output"]["completion_mask"].double()
        # the token-weighted mean of w is 1 over the generation batch
        assert ((cm.sum(1) * w.double()).sum() / cm.sum()).item() == pytest.approx(1.0, abs=1e-6)


def test_weights_match_reference_entropies(tiny_qwen2_dir, tmp_path):
    """First generation of a fresh run (policy = the saved tiny model): advantages after = TRL's
    advantages * H_i / H_bar with full-logits float64 entropies at the sampling temperature."""
    trainer = make_trainer(tmp_path, tiny_qwen2_dir, max_steps=1)
    trainer.train()
    rec = trainer.weightings[0]
    out = rec["output"]
    ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
    mask = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)
    fresh = load_model(tiny_qwen2_dir)
    n = out["completion_ids"].size(1)
    logp = torch.log_softmax(reference_logits(fresh, ids, mask)[:, -n:] / 0.9, -1)
    ent = -(logp.exp() * logp).sum(-1)
    cm = out["completion_mask"].double()
    h_i = (ent * cm).sum(1) / cm.sum(1)
    h_bar = (ent * cm).sum() / cm.sum()
    torch.testing.assert_close(rec["w"].double(), h_i / h_bar, rtol=1e-4, atol=1e-6)
    # the recorded output holds the advantages TRL formed (before weighting): the trainer returned them times w
    assert out["advantages"].abs().sum() > 0, "rewards should vary within some group"
    assert not torch.allclose(rec["w"], torch.ones_like(rec["w"]))


def test_fused_logprobs_match_trl(tiny_qwen2_dir, tmp_path):
    trainer = make_trainer(tmp_path, tiny_qwen2_dir)
    torch.manual_seed(1)
    ids = torch.randint(0, 1000, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0  # right padding in the completion
    ours, ent, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, 4, compute_entropy=True)
    theirs, ent_t, _ = super(PrepoGRPOTrainer, trainer)._get_per_token_logps_and_entropies(
        trainer.model, ids, mask, 4, compute_entropy=True)
    valid = mask[:, -4:].bool()
    torch.testing.assert_close(ours[valid], theirs[valid], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ent[valid], ent_t[valid], rtol=1e-4, atol=1e-4)
    head = trainer.model.lm_head.weight
    grad_ours, = torch.autograd.grad((ours * valid).sum() + (ent * valid).sum(), head)
    grad_theirs, = torch.autograd.grad((theirs * valid).sum() + (ent_t * valid).sum(), head)
    torch.testing.assert_close(grad_ours, grad_theirs, rtol=1e-4, atol=1e-6)


def test_all_switches_off_is_plain_grpo(tiny_qwen2_dir, tmp_path):
    from trl import GRPOTrainer

    off = dict(prepo_curriculum=False, prepo_entropy_weighting=False, prepo_fused_logprobs=False, max_steps=2)
    prepo = make_trainer(tmp_path / "a", tiny_qwen2_dir, cls=PrepoGRPOTrainer, **off)
    prepo.train()

    from transformers import AutoTokenizer

    plain = GRPOTrainer(model=load_model(tiny_qwen2_dir),
                        reward_funcs=reward_chars, args=make_config(tmp_path / "b", **off),
                        train_dataset=prompt_dataset(), processing_class=AutoTokenizer.from_pretrained(tiny_qwen2_dir))
    plain.train()
    ours = [h for h in prepo.state.log_history if "loss" in h]
    theirs = [h for h in plain.state.log_history if "loss" in h]
    assert not any(k.startswith("prepo/") for h in ours for k in h)
    for a, b in zip(ours, theirs, strict=True):
        assert a["loss"] == b["loss"] and a["reward"] == b["reward"]


def test_resume_keeps_curriculum_position(tiny_qwen2_dir, tmp_path):
    full = make_trainer(tmp_path / "full", tiny_qwen2_dir, save_strategy="steps", save_steps=2)
    full.train()
    resumed = make_trainer(tmp_path / "full", tiny_qwen2_dir)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    assert [s["step"] for s in resumed.selections] == [2]
    a, b = full.selections[2], resumed.selections[0]
    assert b["rho"] == a["rho"] == pytest.approx(2 / 3)
    assert [c["uid"] for c in b["candidates"]] == [c["uid"] for c in a["candidates"]]
    torch.testing.assert_close(b["ppl"], a["ppl"])
    assert [r["uid"] for r in b["rows"]] == [r["uid"] for r in a["rows"]]


@pytest.mark.parametrize("bad, match", [
    (dict(prepo_candidate_multiple=0), "prepo_candidate_multiple"),
    (dict(prepo_candidate_multiple=11), "fewer than one candidate batch"),
])
def test_bad_setups(tiny_qwen2_dir, tmp_path, bad, match):
    with pytest.raises(ValueError, match=match):
        make_trainer(tmp_path, tiny_qwen2_dir, **bad)


def test_bad_dataset_and_config(tiny_qwen2_dir, tmp_path):
    from transformers import AutoTokenizer
    from trl import GRPOConfig

    tok = AutoTokenizer.from_pretrained(tiny_qwen2_dir)
    iterable = prompt_dataset().to_iterable_dataset()
    with pytest.raises(ValueError, match="map-style train_dataset"):
        PrepoGRPOTrainer(model=load_model(tiny_qwen2_dir), reward_funcs=reward_chars, args=make_config(tmp_path),
                         train_dataset=iterable, processing_class=tok)
    plain_args = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=G * K, num_generations=G,
                            use_cpu=True, report_to="none")
    with pytest.raises(TypeError, match="PrepoGRPOConfig"):
        PrepoGRPOTrainer(model=load_model(tiny_qwen2_dir), reward_funcs=reward_chars, args=plain_args,
                         train_dataset=prompt_dataset(), processing_class=tok)


def test_entropies_reuse_trls_old_logprob_pass(tiny_qwen2_dir, tmp_path):
    """steps_per_generation=2 with one accumulation step: TRL makes a no-grad pass for the old
    log-probs, and the weights take their entropies from it instead of a pass of their own."""

    class Counting(Recording):
        extra_passes = 0

        def _completion_entropy(self, output):
            self.extra_passes += 1
            return super()._completion_entropy(output)

    trainer = make_trainer(tmp_path, tiny_qwen2_dir, cls=Counting, per_device_train_batch_size=G * K // 2,
                           steps_per_generation=2, max_steps=2)
    trainer.train()
    assert trainer.extra_passes == 0 and len(trainer.weightings) == 1
    rec = trainer.weightings[0]
    assert "old_per_token_logps" in rec["output"]
    trainer.model.load_state_dict(load_model(tiny_qwen2_dir).state_dict())  # the policy that generated
    entropy = trainer._completion_entropy(rec["output"])
    from prepo.signals.weighting import relative_entropy_weights

    torch.testing.assert_close(rec["w"], relative_entropy_weights(entropy, rec["output"]["completion_mask"]))
    assert torch.equal(rec["advantages_out"], rec["output"]["advantages"] * rec["w"])


def _two_rank_worker(model_dir: str, out_dir: str) -> None:
    """Run under torchrun with 2 CPU processes: 2 steps, then rank 0 writes what every rank saw."""
    import json
    import pathlib

    from accelerate.utils import gather_object

    class WithEntropy(Recording):
        def _rollout_weights(self, output):
            w = super()._rollout_weights(output)
            self.weightings[-1]["entropy"] = self._completion_entropy(output)  # same policy and inputs
            return w

    trainer = make_trainer(pathlib.Path(out_dir), model_dir, cls=WithEntropy, per_device_train_batch_size=G,
                           max_steps=2)
    trainer.train()
    seen = dict(
        selections=[dict(rho=s["rho"], candidates=[c["uid"] for c in s["candidates"]], ppl=s["ppl"].tolist(),
                         rows=[r["uid"] for r in s["rows"]]) for s in trainer.selections],
        weights=[r["w"].tolist() for r in trainer.weightings],
        entropy_sums=[(r["entropy"] * r["output"]["completion_mask"]).sum(1).tolist() for r in trainer.weightings],
        masks=[r["output"]["completion_mask"].sum(1).tolist() for r in trainer.weightings],
        param_sum=sum(p.double().sum().item() for p in trainer.model.parameters()),
    )
    every = gather_object([seen])
    if trainer.accelerator.is_main_process:
        logs = [h for h in trainer.state.log_history if "loss" in h]
        pathlib.Path(out_dir, "ranks.json").write_text(json.dumps(dict(ranks=every, logs=logs)))


def test_two_processes_select_the_same_window(tiny_qwen2_dir, tmp_path):
    """2 CPU ranks (torchrun, gloo): each scores its half of the candidates; the gathered scores
    give one window, split over the ranks in TRL's group layout; H_bar spans both ranks; DDP keeps
    the replicas equal through the fused loss path."""
    import json
    import os
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           __file__, str(tiny_qwen2_dir), str(tmp_path)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "ranks.json").read_text())
    r0, r1 = result["ranks"]
    assert r0["param_sum"] == r1["param_sum"]
    for step, (s0, s1) in enumerate(zip(r0["selections"], r1["selections"], strict=True)):
        candidates, ppl = s0["candidates"] + s1["candidates"], s0["ppl"] + s1["ppl"]
        assert len(set(candidates)) == M * K and s0["rho"] == s1["rho"] == step / 2
        order = sorted(range(M * K), key=lambda i: (ppl[i], i))
        start = math.floor(s0["rho"] * (M * K - K))
        window = [candidates[i] for i in order[start : start + K]]
        assert s0["rows"] + s1["rows"] == [u for u in window for _ in range(G)]
        assert result["logs"][step]["prepo/candidates_scored"] == M * K
    for i in range(len(r0["weights"])):
        w, n = np.array(r0["weights"][i] + r1["weights"][i]), np.array(r0["masks"][i] + r1["masks"][i])
        h_sum = np.array(r0["entropy_sums"][i] + r1["entropy_sums"][i])
        np.testing.assert_allclose(w, (h_sum / n) / (h_sum.sum() / n.sum()), rtol=1e-5)  # H_bar over both ranks


if __name__ == "__main__":
    import sys

    _two_rank_worker(sys.argv[1], sys.argv[2])


@pytest.mark.parametrize("old_logprobs", [True, False])
def test_fused_loss_matches_trls_loss(tiny_qwen2_dir, tmp_path, old_logprobs):
    """The loss is linear_grpo_loss, with old log-probs in the batch (steps_per_generation=2 over
    one accumulation step) and without (on-policy, TRL's ratio of exactly 1); training with it gives
    the parameters and the logged metrics of TRL's own loss on the fused log-probs, within float
    rounding."""

    import prepo.integrations.trl as prepo_trl
    from trl import GRPOTrainer

    class Counting(PrepoGRPOTrainer):
        fused_calls = 0

        def _compute_loss(self, model, inputs):
            real = prepo_trl.linear_grpo_loss

            def counted(*a, **k):
                self.fused_calls += 1
                return real(*a, **k)

            prepo_trl.linear_grpo_loss = counted
            try:
                return super()._compute_loss(model, inputs)
            finally:
                prepo_trl.linear_grpo_loss = real

    class TrlLoss(PrepoGRPOTrainer):   # TRL's own loss on the fused log-probs
        def _compute_loss(self, model, inputs):
            return GRPOTrainer._compute_loss(self, model, inputs)

    # SGD, not AdamW: AdamW's first steps move every weight by about lr whatever the gradient's size,
    # so rounding-level gradients of opposite signs would part the two runs by lr per weight
    kw = dict(max_steps=4, optim="sgd", learning_rate=0.5)
    if old_logprobs:   # a large step, so that the second step's ratios leave the clip range
        kw.update(per_device_train_batch_size=G * K // 2, steps_per_generation=2, learning_rate=2.0)
    def half_zero(completions, uid, **kwargs):   # the odd prompts' groups have zero reward variance
        return [0.0 if u % 2 else r for u, r in zip(uid, reward_chars(completions))]

    # with old log-probs, one group per optimizer step, reward_chars' (their ratios get clipped);
    # on-policy, half_zero's groups of both kinds (the fused loss skips the zero-variance ones)
    reward = reward_chars if old_logprobs else half_zero

    from transformers import AutoTokenizer

    def train(cls):   # built and trained before the next is built: the Trainer seeds the RNGs as it is built
        trainer = cls(model=load_model(tiny_qwen2_dir), reward_funcs=reward, train_dataset=prompt_dataset(),
                      args=make_config(tmp_path / cls.__name__, **kw),
                      processing_class=AutoTokenizer.from_pretrained(tiny_qwen2_dir))
        trainer.train()
        return trainer

    fused, ref = train(Counting), train(TrlLoss)
    assert fused.fused_calls == 4
    ours = [h for h in fused.state.log_history if "loss" in h]
    theirs = [h for h in ref.state.log_history if "loss" in h]
    assert len(ours) == len(theirs) == 4 and ours[0].keys() == theirs[0].keys()
    # with old log-probs the ratios moved out of the clip range; without, they are 1
    assert any(h["clip_ratio/region_mean"] > 0 for h in theirs) == old_logprobs
    assert old_logprobs or any(h["frac_reward_zero_std"] > 0 for h in theirs)
    for a, b in zip(ours, theirs):
        a.pop("step_time"), b.pop("step_time")
        assert a == pytest.approx(b, rel=1e-4, abs=1e-6)
    for (name, p), q in zip(fused.model.named_parameters(), ref.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)
