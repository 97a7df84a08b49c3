"""One generation prompt: RL rollouts, memento-eval, the training data renderer and vLLM's chat
rendering produce the same token ids for the same problem, byte-identical to the serving template."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from memento_train.data.render import Renderer
from memento_train.evaluation.runner import Problem, render_prompts
from memento_train.generation.prompt import generation_prompt_ids, generation_prompt_text
from memento_train.models.shipped_tokenizer import load_shipped_tokenizer
from memento_train.rl.driver import encode_prompts

PROBLEM = "Compute $3 + 4 \\cdot 5$ (mod 10)."
# A Qwen3-style template: the generation prompt may differ from the plain ChatML one (here it opens an
# empty think block when thinking is disabled), so "no <think> appended" is a property of the template.
QWEN3_LIKE = (
    "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}{%- endif %}"
)


def vllm_chat_prompt_ids(tokenizer, problem: str, system_prompt: str | None) -> list[int]:
    """What vLLM's chat endpoint feeds the model for this conversation (its own rendering code)."""
    pytest.importorskip("vllm")
    from vllm.renderers.hf import safe_apply_chat_template

    stub = SimpleNamespace(
        tokenizer_revision=None,
        code_revision=None,
        trust_remote_code=False,
        tokenizer=tokenizer.name_or_path,
        model=tokenizer.name_or_path,
    )
    messages = ([] if system_prompt is None else [{"role": "system", "content": system_prompt}]) + [
        {"role": "user", "content": problem}
    ]
    return list(safe_apply_chat_template(stub, tokenizer, messages, tokenize=True, add_generation_prompt=True))


@pytest.mark.parametrize("template", ["shipped", "qwen3_like"])
@pytest.mark.parametrize("system_prompt", [None, "Think in blocks."])
def test_rl_eval_renderer_and_vllm_render_the_same_prompt_ids(tmp_path, template, system_prompt):
    tok = load_shipped_tokenizer()
    if template == "qwen3_like":
        tok.chat_template = QWEN3_LIKE
    tok.save_pretrained(tmp_path / "export")  # what an export (and so the server) holds
    from transformers import AutoTokenizer

    served = AutoTokenizer.from_pretrained(str(tmp_path / "export"))
    ids = generation_prompt_ids(tok, PROBLEM, system_prompt)
    serving = served.apply_chat_template(
        ([] if system_prompt is None else [{"role": "system", "content": system_prompt}])
        + [{"role": "user", "content": PROBLEM}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert generation_prompt_text(tok, PROBLEM, system_prompt) == serving  # byte-identical text
    assert tok.decode(ids, skip_special_tokens=False) == serving and serving.endswith("<|im_start|>assistant\n")

    _, (rl,) = encode_prompts([{"problem": PROBLEM, "answer": "3"}], tok, 1024, system_prompt)
    (ev,) = render_prompts(tok, [Problem("p", PROBLEM, "3")], system_prompt)
    example = Renderer(tok, system_prompt=system_prompt).render({"problem": PROBLEM, "response": "<think>\n</think>3"})
    data = example.input_ids[: example.prompt_len].tolist()
    assert rl == ev == data == ids
    assert vllm_chat_prompt_ids(served, PROBLEM, system_prompt) == ids
