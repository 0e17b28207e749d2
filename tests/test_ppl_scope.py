"""``ppl_scope``: the prompt perplexity averages the problem's tokens (or the last user message, or
every token after the first), conditioned on what comes before; on a real BPE tokenizer (Qwen's)
with a tiny Qwen2, and on SmolLM2-135M-Instruct's own tokenizer and template (slow)."""
import copy

import pytest
import torch

from prepo.config import ConfigError, from_dict
from prepo.prompts import PromptEncoder, PromptFormat
from prepo.signals.scoring import MIN_SHARED, prompt_perplexity

SUFFIX = "Answer with the number only."
CHAT = [{"role": "user", "content": "What is 7 plus 8?"}, {"role": "assistant", "content": "15"},
        {"role": "user", "content": "Anna has 12 apples and gives 5 away. How many are left?"}]
PROMPTS = ["What is 4 + 3?", "Compute 17 - 9.", CHAT]


@pytest.fixture(scope="module")
def tiny(tiny_qwen2_dir):
    from prepo.policy import load_policy

    return load_policy(tiny_qwen2_dir, torch.device("cpu"))


def ppl(model, tok, prompts, **fmt):
    return prompt_perplexity(model, PromptEncoder(tok, PromptFormat(chat_template=True, **fmt)), prompts, impl="torch")


def with_generation_prompt(tok, header: str):
    """A copy of ``tok`` whose chat template (conftest's Qwen one) opens the assistant's turn with ``header``."""
    other = copy.deepcopy(tok)
    other.chat_template = tok.chat_template.replace("'<|im_start|>assistant\\n'", repr(header))
    assert other.chat_template != tok.chat_template
    return other


def test_problem_scope_ignores_what_follows_the_problem(tiny):
    """The model is causal: text after the problem (instruction suffix, generation prompt) cannot
    move its perplexity; under ``prompt`` (today's whole-prompt score) both do."""
    model, tok = tiny
    base = ppl(model, tok, PROMPTS, instruction_suffix=SUFFIX, ppl_scope="problem")
    other_suffix = ppl(model, tok, PROMPTS, instruction_suffix="Reply with one number.", ppl_scope="problem")
    other_header = ppl(model, with_generation_prompt(tok, "<|im_start|>assistant\nSure.\n"), PROMPTS,
                       instruction_suffix=SUFFIX, ppl_scope="problem")
    torch.testing.assert_close(other_suffix, base, rtol=1e-5, atol=0)
    torch.testing.assert_close(other_header, base, rtol=1e-5, atol=0)
    whole = ppl(model, tok, PROMPTS, instruction_suffix=SUFFIX, ppl_scope="prompt")
    whole_suffix = ppl(model, tok, PROMPTS, instruction_suffix="Reply with one number.", ppl_scope="prompt")
    whole_header = ppl(model, with_generation_prompt(tok, "<|im_start|>assistant\nSure.\n"), PROMPTS,
                       instruction_suffix=SUFFIX, ppl_scope="prompt")
    assert ((whole - base).abs() > 1e-3 * base).all()
    assert ((whole_suffix - whole).abs() > 1e-4 * whole).all() and ((whole_header - whole).abs() > 1e-4 * whole).all()
    user = ppl(model, tok, PROMPTS, instruction_suffix=SUFFIX, ppl_scope="user")
    user_suffix = ppl(model, tok, PROMPTS, instruction_suffix="Reply with one number.", ppl_scope="user")
    assert ((user_suffix - user).abs() > 1e-4 * user).all()   # the suffix is part of the user message


def test_problem_scope_is_conditioned_on_the_system_turn(tiny):
    """The tokens before the span condition it: another system prompt moves the problem's score."""
    model, tok = tiny
    a = ppl(model, tok, PROMPTS[:2], system_prompt="You are a careful solver.")
    b = ppl(model, tok, PROMPTS[:2], system_prompt="You answer riddles.")
    assert ((a - b).abs() > 1e-4 * a).all()


@pytest.mark.parametrize("scope,text", [("problem", CHAT[-1]["content"]),
                                        ("user", CHAT[-1]["content"] + "\n" + SUFFIX)])
def test_last_user_turn_is_scored_against_float64_truth(tiny, scope, text):
    """A chat with several user turns scores its last one: the scored tokens decode to that text,
    and the perplexity is exp(-mean log p) of exactly those tokens under the HF model's own float64
    logits (an off-by-one in the span or its alignment fails)."""
    model, tok = tiny
    enc = PromptEncoder(tok, PromptFormat(instruction_suffix=SUFFIX, ppl_scope=scope))
    ids, mask, scored = enc.scored([CHAT])
    assert tok.decode(ids[0][scored[0]]).strip() == text
    m64 = model.to(torch.float64)
    try:
        with torch.no_grad():
            logp = torch.log_softmax(m64(input_ids=ids, attention_mask=mask).logits[0, :-1], dim=-1)
    finally:
        model.to(torch.float32)
    tok_lp = logp.gather(1, ids[0, 1:, None])[:, 0]
    truth = torch.exp(-tok_lp[scored[0, 1:]].mean())
    got = prompt_perplexity(model, enc, [CHAT], impl="torch")
    torch.testing.assert_close(got.double(), truth[None], rtol=1e-4, atol=0)


@pytest.mark.parametrize("scope", ["problem", "user", "prompt"])
def test_a_mixed_batch_is_scored_against_float64_truth_on_the_tokens_it_needs(tiny, scope, monkeypatch):
    """Prompts whose spans start and end at different distances from their ends (a string, a
    longer one, a chat), in one micro-batch: each against exp(-mean log p) of its scored tokens under
    the HF model's own float64 logits, the prompt alone. The decoder runs the shared leading tokens
    once per micro-batch (of about one length) and each row only up to its last scored token."""
    import prepo_kernels.hf

    model, tok = tiny
    prompts = ["What is 4 + 3?", "A farmer has 17 sheep and buys 9 more. How many does he have now?", CHAT]
    enc = PromptEncoder(tok, PromptFormat(chat_template=True, instruction_suffix=SUFFIX, ppl_scope=scope))
    ids, mask, scored = enc.scored(prompts)
    truth = []
    m64 = model.to(torch.float64)
    try:
        for p in prompts:
            i, _, s = enc.scored([p])
            with torch.no_grad():
                logp = torch.log_softmax(m64(input_ids=i).logits[0, :-1], dim=-1)
            truth.append(torch.exp(-logp.gather(1, i[0, 1:, None])[:, 0][s[0, 1:]].mean()))
    finally:
        model.to(torch.float32)
    decoder, _ = prepo_kernels.hf.decoder_and_head(model)
    seen = []
    hook = decoder.register_forward_pre_hook(lambda mod, args, kw: seen.append(tuple(kw["input_ids"].shape)),
                                             with_kwargs=True)
    try:
        got = prompt_perplexity(model, enc, prompts, impl="torch")
    finally:
        hook.remove()
    torch.testing.assert_close(got.double(), torch.stack(truth), rtol=1e-4, atol=0)
    needed = [int(s.nonzero()[-1]) + 1 - int((m == 0).sum()) for s, m in zip(scored, mask)]   # up to the last scored
    if scope == "prompt":   # scored from the second token on: nothing to share, the rows run whole
        assert sum(b for b, _ in seen) == 3 and max(t for _, t in seen) == max(needed)
    else:   # per micro-batch, the template's system turn and user header once, then each row's rest
        pairs = list(zip(seen[::2], seen[1::2]))
        assert len(seen) % 2 == 0 and all(one == 1 and shared >= MIN_SHARED for (one, shared), _ in pairs)
        assert sum(rows for _, (rows, _) in pairs) == 3
        assert max(shared + rest for (_, shared), (_, rest) in pairs) == max(needed)


def test_prompt_scope_is_every_token_after_the_first(qwen_tokenizer):
    enc = PromptEncoder(qwen_tokenizer, PromptFormat(chat_template=True, ppl_scope="prompt"))
    ids, mask, scored = enc.scored(PROMPTS)
    expect = mask.bool().clone()
    expect[:, 1:] &= mask[:, :-1].bool()
    expect[:, 0] = False
    for row in range(len(PROMPTS)):   # left-padded: a row's first real token is not scored
        expect[row, int((mask[row] == 0).sum())] = False
    assert torch.equal(scored, expect)


def test_without_template_the_scopes_agree_on_the_builtin_task():
    """The built-in tasks (character tokenizer, <bos>, no template, no suffix): every scope scores
    the tokens after <bos>, as the whole-prompt score did, so the default run does not change."""
    from prepo.tasks import TASKS
    from prepo.tokenizer import build_tokenizer

    task = TASKS["arithmetic"]
    tok = build_tokenizer(task.chars)
    prompts = [p.prompt for p in task.generate(20, seed=0)]
    got = [PromptEncoder(tok, PromptFormat(ppl_scope=s)).scored(prompts) for s in ("problem", "user", "prompt")]
    for ids, mask, scored in got[1:]:
        assert torch.equal(ids, got[0][0]) and torch.equal(scored, got[0][2])
    ids, mask, scored = got[0]
    assert torch.equal(scored[:, 1:], (mask[:, 1:] * mask[:, :-1]).bool()) and not scored[:, 0].any()


def test_suffix_without_template_is_left_out_of_problem_scope(qwen_tokenizer):
    enc = PromptEncoder(qwen_tokenizer, PromptFormat(instruction_suffix=SUFFIX, ppl_scope="problem"))
    ids, _, scored = enc.scored(["The capital of France is Paris. What is 2 + 2?"])
    # Qwen adds no <bos>: the first token ("The") has no log-prob; Qwen's BPE joins "?" and the newline
    assert qwen_tokenizer.decode(ids[0][scored[0]]) == " capital of France is Paris. What is 2 + 2?\n"


def test_slow_tokenizer_names_the_option_to_use():
    """A tokenizer without an offset mapping cannot locate the problem: an error at construction
    naming ``ppl_scope prompt``, which works with it. (CANINE's Python tokenizer silently ignores
    ``return_offsets_mapping``.)"""
    from transformers import CanineTokenizer

    slow = CanineTokenizer()
    assert not slow.is_fast and "offset_mapping" not in slow("ab", return_offsets_mapping=True)
    with pytest.raises(ConfigError, match="use ppl_scope prompt"):
        PromptEncoder(slow, PromptFormat(ppl_scope="problem"))
    PromptEncoder(slow, PromptFormat(ppl_scope="prompt"))


def test_template_that_rewrites_the_message_is_an_error(qwen_tokenizer):
    tok = copy.deepcopy(qwen_tokenizer)
    tok.chat_template = tok.chat_template.replace("message['content']", "message['content'] | upper")
    with pytest.raises(ValueError, match="use ppl_scope prompt"):
        PromptEncoder(tok, PromptFormat(chat_template=True)).scored(["what is 2 + 2?"])


def test_config_key():
    assert from_dict({}).ppl_scope == "problem"
    assert from_dict({"ppl_scope": "prompt"}).ppl_scope == "prompt"
    with pytest.raises(ConfigError, match="ppl_scope must be one of problem, user, prompt"):
        from_dict({"ppl_scope": "system"})


@pytest.mark.slow
def test_smollm2_problem_scope(smollm2_dir):
    """SmolLM2-135M-Instruct's tokenizer and template (its default system turn, 30-odd tokens):
    the problem's tokens are found, and its perplexity ignores the suffix and the generation prompt."""
    from prepo.policy import load_policy

    model, tok = load_policy(smollm2_dir, torch.device("cpu"))
    enc = PromptEncoder(tok, PromptFormat(chat_template=True, instruction_suffix=SUFFIX))
    ids, mask, scored = enc.scored(PROMPTS)
    assert [tok.decode(ids[i][scored[i]]).strip() for i in range(3)] == [PROMPTS[0], PROMPTS[1], CHAT[-1]["content"]]
    assert (mask.sum(1) - scored.sum(1) > 30).all()   # the template's tokens are context, not score
    base = ppl(model, tok, PROMPTS, instruction_suffix=SUFFIX)
    torch.testing.assert_close(ppl(model, tok, PROMPTS, instruction_suffix="Reply with one number."), base,
                               rtol=1e-4, atol=0)
    other = copy.deepcopy(tok)   # its generation prompt, a literal in the template, opened differently
    other.chat_template = tok.chat_template.replace("<|im_start|>assistant\n", "<|im_start|>assistant\nSure.\n")
    assert other.chat_template.count("Sure.") == 1
    torch.testing.assert_close(ppl(model, other, PROMPTS, instruction_suffix=SUFFIX), base, rtol=1e-4, atol=0)
    whole = ppl(model, tok, PROMPTS, instruction_suffix=SUFFIX, ppl_scope="prompt")
    assert ((whole - base).abs() > 1e-2 * base).all()


def test_a_message_whose_text_recurs_in_the_template_is_found_in_place(qwen_tokenizer):
    """'assistant' also appears in the template's generation prompt, after the message: the span
    is the message's own place, not the last match in the text."""
    enc = PromptEncoder(qwen_tokenizer, PromptFormat(chat_template=True))
    ids, mask, scored = enc.scored(["assistant"])
    text = qwen_tokenizer.decode(ids[0])
    start = text.index("user\nassistant") + len("user\n")
    pos = [i for i in range(ids.shape[1]) if scored[0, i]]
    assert qwen_tokenizer.decode(ids[0, pos]) == "assistant"
    assert len(qwen_tokenizer.decode(ids[0, : pos[0]])) == start
