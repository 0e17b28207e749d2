"""PREPOTrainer against verl 0.9's real config, trainer registry, Ray and TransferQueue (CPU).

What runs here: verl's Hydra config composed with the documented overrides, the trainer built
from it, the registration reaching a Ray worker through the documented setup hook, the advantage
step (verl's GRPO, then the entropy weights) on a batch in a real TransferQueue, and the candidate
scoring + window through verl's dataloader (the documented parquet layout), a real Ray worker
group, dispatch and TransferQueue bridge, with a tiny Qwen2 standing in for the FSDP actor.
What cannot: verl's FSDP/Megatron actor engine and the rollout (vLLM/SGLang) need GPUs.
"""
import os

import numpy as np
import pandas as pd
import pytest
import ray
import torch
import transfer_queue as tq
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf
from tensordict import TensorDict

from prepo.integrations.verl import PREPOTrainer, VerlPrepoParams, check_trainer_config, check_verl_version
from verl.single_controller.base.decorator import make_nd_compute_dataproto_dispatch_fn, register
from verl.single_controller.base.worker import Worker
from verl.single_controller.ray import RayClassWithInitArgs, RayResourcePool, RayWorkerGroup
from verl.trainer.constants_ppo import get_ppo_ray_runtime_env
from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage
from verl.trainer.ppo.v1 import get_trainer_cls
from verl.utils import tensordict_utils as tu

HOOK = "+ray_kwargs.ray_init.runtime_env.worker_process_setup_hook=prepo.integrations.verl.register"


def verl_config(*overrides):
    with initialize_config_module("verl.trainer.config", version_base=None):
        return compose("ppo_trainer", overrides=["trainer.v1.trainer_mode=prepo", *overrides])


def test_registry_and_params_from_documented_overrides():
    assert get_trainer_cls("prepo") is PREPOTrainer
    cfg = verl_config("+trainer.prepo.candidate_multiple=3", "+trainer.prepo.pacing=quadratic",
                      "+trainer.prepo.weighting=false", HOOK)
    assert VerlPrepoParams.from_config(cfg) == VerlPrepoParams(candidate_multiple=3, pacing="quadratic",
                                                               curriculum=True, weighting=False)
    assert VerlPrepoParams.from_config(verl_config()) == VerlPrepoParams()
    assert VerlPrepoParams.from_config(verl_config("+trainer.prepo.ppl_scope=prompt")).ppl_scope == "prompt"
    check_trainer_config(cfg, VerlPrepoParams.from_config(cfg))


@pytest.mark.parametrize("overrides,match", [
    (["+trainer.prepo.candidate_multiple=0"], "candidate_multiple"),
    (["+trainer.prepo.pacing=cubic"], "pacing"),
    (["+trainer.prepo.ppl_scope=system"], "ppl_scope"),
    (["+trainer.prepo.multiple=5"], "unknown trainer.prepo options"),
])
def test_bad_params(overrides, match):
    with pytest.raises(ValueError, match=match):
        VerlPrepoParams.from_config(verl_config(*overrides))


@pytest.mark.parametrize("overrides,match", [
    (["algorithm.filter_groups.enable=true"], "filter_groups"),
    (["trainer.v1.sampler.sync_refill_failed_groups=true"], "sync_refill_failed_groups"),
    (["algorithm.rollout_correction.bypass_mode=true"], "bypass_mode"),
])
def test_unsupported_trainer_settings(overrides, match):
    cfg = verl_config(*overrides)
    with pytest.raises(ValueError, match=match):
        check_trainer_config(cfg, VerlPrepoParams())
    with pytest.raises(ValueError, match=match):
        PREPOTrainer(cfg)
    if "bypass_mode" in match:  # without the weights the old-log-prob entropies are not needed
        check_trainer_config(cfg, VerlPrepoParams(weighting=False))


def test_version_gate():
    check_verl_version("0.9.1")
    for bad in ("0.8.0", "0.7.1", "0.10.0"):
        with pytest.raises(ImportError, match="supports verl >= 0.9"):
            check_verl_version(bad)


@pytest.fixture(scope="module")
def ray_tq():
    """Ray started the way verl's run_ppo starts it (its runtime env merged with the documented
    override), and a TransferQueue on it (one storage unit: this machine is small)."""
    cfg = verl_config(HOOK)
    runtime_env = OmegaConf.merge(get_ppo_ray_runtime_env(cfg), cfg.ray_kwargs.ray_init.runtime_env)
    env_vars = runtime_env.setdefault("env_vars", {})
    env_vars["TRANSFER_QUEUE_ENABLE"] = "1"
    # Ray workers import this module to build TinyActorWorker
    env_vars["PYTHONPATH"] = os.pathsep.join(filter(None, [os.path.dirname(__file__), os.environ.get("PYTHONPATH")]))
    ray.init(num_cpus=8, include_dashboard=False, runtime_env=OmegaConf.to_container(runtime_env))
    cfg.transfer_queue.enable = True
    cfg.transfer_queue.backend.SimpleStorage.num_data_storage_units = 1
    tq.init(cfg.transfer_queue)
    yield
    tq.close()
    ray.shutdown()


@ray.remote
def _trainer_in_worker():
    import sys

    from verl.trainer.ppo.v1 import get_trainer_cls as lookup
    return "prepo.integrations.verl" in sys.modules, lookup("prepo").__name__


def test_setup_hook_registers_in_ray_workers(ray_tq):
    assert ray.get(_trainer_in_worker.remote()) == (True, "PREPOTrainer")


def put_scored_batch(n_groups=2, rollout_n=3, t=7, seed=0):
    """A batch as the v1 trainer holds it in TransferQueue after reward and old-log-prob steps:
    jagged per-response fields under keys {uid}_{session}_{index}."""
    g = torch.Generator().manual_seed(seed)
    n = n_groups * rollout_n
    lengths = torch.randint(1, t + 1, (n,), generator=g).tolist()
    uids = [f"u{i // rollout_n}" for i in range(n)]
    keys = [f"{uids[i]}_{i % rollout_n}_0" for i in range(n)]
    scores = [torch.zeros(L) for L in lengths]
    for i, s in enumerate(scores):
        s[-1] = float(torch.randint(0, 2, (1,), generator=g))
    entropy = [torch.rand(L, generator=g) * 2 for L in lengths]

    def jagged(parts):
        return torch.nested.as_nested_tensor(parts, layout=torch.jagged)

    fields = TensorDict({
        "uid": torch.tensor([int(u[1:]) for u in uids]),
        "response_mask": jagged([torch.ones(L, dtype=torch.int64) for L in lengths]),
        "rm_scores": jagged(scores),
        "old_log_probs": jagged([-torch.rand(L, generator=g) for L in lengths]),
        "entropy": jagged(entropy),
    }, batch_size=n)
    meta = tq.kv_batch_put(keys=keys, partition_id="train", fields=fields, tags=[{"status": "success"}] * n)
    return meta, lengths, scores, entropy, uids


@pytest.mark.parametrize("weighting", [True, False])
def test_compute_advantage_weights_verl_grpo(ray_tq, weighting):
    cfg = verl_config("algorithm.adv_estimator=grpo", "actor_rollout_ref.rollout.n=3",
                      f"+trainer.prepo.weighting={str(weighting).lower()}")
    trainer = PREPOTrainer(cfg)
    assert trainer.trainer_mode == "sync"  # selected as "prepo", behaves as verl's sync trainer
    meta, lengths, scores, entropy, uids = put_scored_batch()
    try:
        metrics = {}
        meta = trainer._compute_advantage(meta, metrics)
        adv = tq.kv_batch_get(keys=meta.keys, partition_id="train", select_fields=["advantages"])["advantages"]
    finally:
        tq.kv_clear(keys=meta.keys, partition_id="train")

    t = max(lengths)
    mask = (torch.arange(t)[None] < torch.tensor(lengths)[:, None]).float()
    rewards = torch.stack([torch.nn.functional.pad(s, (0, t - len(s))) for s in scores])
    ref_adv, _ = compute_grpo_outcome_advantage(rewards, mask, np.array(uids, dtype=object))
    if weighting:
        h_i = torch.stack([e.double().mean() for e in entropy])
        h_bar = torch.cat(entropy).double().mean()
        ref_adv = ref_adv.double() * (h_i / h_bar)[:, None]
        assert set(metrics) >= {"prepo/entropy_weight_min", "prepo/entropy_weight_max"}
    else:
        assert not any(k.startswith("prepo/") for k in metrics)
    assert adv.is_nested and adv.offsets().diff().tolist() == lengths
    torch.testing.assert_close(adv.to_padded_tensor(0.0).double(), (ref_adv * mask).double(), rtol=1e-5, atol=1e-6)


TINY_QWEN2 = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)


def tiny_policy(vocab_size):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(1234)  # the same weights in every process
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab_size, **TINY_QWEN2)).eval()


@ray.remote
class TinyActorWorker(Worker):
    """Stands in for verl's FSDP actor (which needs a GPU) behind the real single-controller
    dispatch and TransferQueue bridge: compute_log_prob returns per-token log-probs in the engine's
    layout (jagged over the whole sequence, position t holding log p(x_{t+1}), the last 0)."""

    def __init__(self, vocab_size):
        super().__init__()
        self.model = tiny_policy(vocab_size)
        self._register_dispatch_collect_info(mesh_name="actor", dp_rank=self.rank, is_collect=True)

    @register(dispatch_mode=make_nd_compute_dataproto_dispatch_fn(mesh_name="actor"))
    def compute_log_prob(self, data: TensorDict) -> TensorDict:
        assert tu.get(data, "temperature") == 1.0 and tu.get(data, "calculate_entropy") is False
        out = []
        with torch.no_grad():
            for ids in data["input_ids"].unbind(0):
                logits = self.model(ids.unsqueeze(0)).logits[0].float()
                lp = torch.log_softmax(logits[:-1], -1).gather(-1, ids[1:, None])[:, 0]
                out.append(torch.cat([lp, lp.new_zeros(1)]))
        return TensorDict({"log_probs": torch.nested.as_nested_tensor(out, layout=torch.jagged)},
                          batch_size=len(out))


def write_parquet(path, questions):
    """The documented layout: verl's RLHFDataset columns (prompt = chat messages)."""
    pd.DataFrame({
        "data_source": ["prepo_arith"] * len(questions),
        "prompt": [[{"role": "user", "content": q}] for q in questions],
        "ability": ["math"] * len(questions),
        "reward_model": [{"style": "rule", "ground_truth": str(i)} for i in range(len(questions))],
        "extra_info": [{"split": "train", "index": i} for i in range(len(questions))],
    }).to_parquet(path)


def test_next_train_batch_scores_candidates_through_actor_worker_group(ray_tq, tokenizer, tmp_path):
    """15 prompts, train_batch_size 3, candidate_multiple 5: every candidate batch is the whole data
    set (in a shuffled order), so the window is known: sort all 15 by float64 perplexity under the
    same policy, take 3 consecutive from floor(rho * 12). 15 candidates over 2 dp ranks also
    exercises the padding to the dispatcher's even split."""
    questions = [" ".join(["what is"] + [str(d) for d in range(i % 7 + 1)] + ["+ 1 ?"] * (i % 3 + 1))
                 for i in range(15)]
    write_parquet(tmp_path / "train.parquet", questions)
    write_parquet(tmp_path / "val.parquet", questions[:4])
    cfg = verl_config(f"data.train_files={tmp_path / 'train.parquet'}", f"data.val_files={tmp_path / 'val.parquet'}",
                      "data.train_batch_size=3", "data.dataloader_num_workers=0", "data.max_prompt_length=64",
                      "trainer.total_training_steps=4", "+trainer.prepo.candidate_multiple=5")
    trainer = PREPOTrainer(cfg)
    trainer.tokenizer, trainer.processor = tokenizer, None  # _init_tokenizer would load a hub model path
    trainer._init_dataloader()
    pool = RayResourcePool([2], use_gpu=False, max_colocate_count=1)
    trainer.actor_rollout_wg = RayWorkerGroup(pool, RayClassWithInitArgs(cls=TinyActorWorker, vocab_size=len(tokenizer)))

    policy = tiny_policy(len(tokenizer)).double()
    ref_ppl = {}   # over the question's own tokens (ppl_scope problem, the default), given the template before it
    with torch.no_grad():
        for q in questions:
            s = tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                              tokenize=True, return_dict=True)["input_ids"]
            toks = tokenizer(q, add_special_tokens=False)["input_ids"]
            lo = next(i for i in range(len(s)) if s[i : i + len(toks)] == toks)
            lp = torch.log_softmax(policy(torch.tensor([s])).logits[0, :-1], -1).gather(-1, torch.tensor(s[1:])[:, None])
            ref_ppl[q] = torch.exp(-lp[lo - 1 : lo - 1 + len(toks)].mean()).item()
    by_ppl = sorted(questions, key=ref_ppl.get)

    for step in (1, 2, 4):
        trainer.global_steps = step
        batch = trainer._next_train_batch()
        rho = (step - 1) / 4
        start = int(np.floor(rho * (15 - 3)))
        assert [m[0]["content"] for m in batch["raw_prompt"]] == by_ppl[start : start + 3]
        assert trainer._prepo_metrics["prepo/rho"] == rho
        np.testing.assert_allclose(trainer._prepo_metrics["prepo/window_ppl_mean"],
                                   np.mean([ref_ppl[q] for q in by_ppl[start : start + 3]]), rtol=1e-5)
        np.testing.assert_allclose(trainer._prepo_metrics["prepo/candidate_ppl_mean"],
                                   np.mean(list(ref_ppl.values())), rtol=1e-5)
    assert not tq.kv_list("prepo_score").get("prepo_score")  # the scoring samples were cleared

    trainer.prepo = VerlPrepoParams(curriculum=False)  # plain verl batch fetching: no scoring pass
    trainer.actor_rollout_wg = None
    assert len(trainer._next_train_batch()) == 3


# The README's launch command, minus `python -m verl.trainer.main_ppo` (paths need not exist here).
LAUNCH_OVERRIDES = [
    "trainer.v1.trainer_mode=prepo",
    "+ray_kwargs.ray_init.runtime_env.worker_process_setup_hook=prepo.integrations.verl.register",
    "+trainer.prepo.candidate_multiple=5",
    "+trainer.prepo.pacing=linear",
    "algorithm.adv_estimator=grpo",
    "algorithm.use_kl_in_reward=false",
    "data.train_files=data/prepo_math/train.parquet",
    "data.val_files=data/prepo_math/test.parquet",
    "data.train_batch_size=128",
    "data.max_prompt_length=512",
    "data.max_response_length=2048",
    "actor_rollout_ref.model.path=Qwen/Qwen2.5-Math-1.5B",
    "actor_rollout_ref.actor.ppo_mini_batch_size=32",
    "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4",
    "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=8",
    "actor_rollout_ref.actor.use_kl_loss=false",
    "actor_rollout_ref.actor.clip_ratio_low=0.2",
    "actor_rollout_ref.actor.clip_ratio_high=0.28",
    "actor_rollout_ref.actor.loss_agg_mode=token-mean",
    "actor_rollout_ref.rollout.name=vllm",
    "actor_rollout_ref.rollout.n=8",
    "trainer.n_gpus_per_node=8",
    "trainer.nnodes=1",
    "trainer.total_training_steps=200",
]


def test_readme_launch_overrides_compose_and_validate():
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config

    with initialize_config_module("verl.trainer.config", version_base=None):
        cfg = compose("ppo_trainer", overrides=LAUNCH_OVERRIDES)
    assert cfg.trainer.use_v1 and get_trainer_cls(cfg.trainer.v1.trainer_mode) is PREPOTrainer
    assert VerlPrepoParams.from_config(cfg) == VerlPrepoParams(candidate_multiple=5, pacing="linear")
    assert cfg.ray_kwargs.ray_init.runtime_env.worker_process_setup_hook == "prepo.integrations.verl.register"
    check_trainer_config(cfg, VerlPrepoParams.from_config(cfg))
    validate_config(config=cfg, use_reference_policy=need_reference_policy(cfg), use_critic=need_critic(cfg))
