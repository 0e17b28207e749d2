"""PREPOTrainer against verl 0.9's real config, trainer registry, Ray and TransferQueue (CPU).

What runs here: verl's Hydra config composed with the documented overrides, the trainer built
from it, the registration reaching a Ray worker through the documented setup hook, and the
advantage step (verl's GRPO, then the entropy weights) on a batch in a real TransferQueue.
What cannot: the actor worker group (FSDP engine) and the rollout (vLLM/SGLang) need GPUs.
"""
import numpy as np
import pytest
import ray
import torch
import transfer_queue as tq
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf
from tensordict import TensorDict

import prepo.integrations.verl as prepo_verl
from prepo.integrations.verl import PREPOTrainer, VerlPrepoParams, check_trainer_config, check_verl_version
from verl.trainer.constants_ppo import get_ppo_ray_runtime_env
from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage
from verl.trainer.ppo.v1 import get_trainer_cls

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
    check_trainer_config(cfg)


@pytest.mark.parametrize("overrides,match", [
    (["+trainer.prepo.candidate_multiple=0"], "candidate_multiple"),
    (["+trainer.prepo.pacing=cubic"], "pacing"),
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
    with pytest.raises(ValueError, match=match):
        check_trainer_config(verl_config(*overrides))
    if "bypass_mode" in match:  # without the weights the old-log-prob entropies are not needed
        check_trainer_config(verl_config(*overrides, "+trainer.prepo.weighting=false"))


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
    runtime_env.setdefault("env_vars", {})["TRANSFER_QUEUE_ENABLE"] = "1"
    ray.init(num_cpus=2, include_dashboard=False, runtime_env=OmegaConf.to_container(runtime_env))
    cfg.transfer_queue.enable = True
    cfg.transfer_queue.backend.SimpleStorage.num_data_storage_units = 1
    tq.init(cfg.transfer_queue)
    yield
    tq.close()
    ray.shutdown()


@ray.remote(num_cpus=0)  # the TransferQueue actors hold this small machine's CPUs
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
