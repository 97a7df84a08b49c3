"""The generation prompt: the one function that turns a problem into the tokens a model generates from.

RL rollouts, ``memento-eval``, the data renderer (the prompt part of every training example) and the
vLLM path all call :func:`generation_prompt_ids`, so the model is trained, rewarded, evaluated and
served on the same bytes. The text is what the serving chat template renders for one user message
with ``add_generation_prompt=True`` (vLLM's chat endpoint renders exactly this and tokenizes it without
adding special tokens): for the Memento models it ends at ``<|im_start|>assistant\\n`` and the model
writes ``<think>`` itself, as in its training data. Nothing is appended after the template: a template
that opens thinking itself (or, with thinking disabled, opens and closes it) is served that way, so it
is trained and evaluated that way too.

A tokenizer without a chat template gets the literal ChatML layout of
:data:`memento_train.tokens.CHATML_TEMPLATE` (what :func:`memento_train.tokens.prepare_model_and_tokenizer`
installs, so the export's serving template renders the same text).
"""

from __future__ import annotations

from typing import Any

from memento_train.tokens import ASSISTANT, IM_END, IM_START


def chat_messages(problem: str, system_prompt: str | None = None) -> list[dict[str, str]]:
    """The conversation of one problem: an optional system message, then the user turn."""
    messages = [] if system_prompt is None else [{"role": "system", "content": system_prompt}]
    messages.append({"role": "user", "content": problem})
    return messages


def generation_prompt_text(tokenizer: Any, problem: str, system_prompt: str | None = None) -> str:
    """The serving chat template's rendering of ``problem`` with the generation prompt (see module)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            chat_messages(problem, system_prompt), tokenize=False, add_generation_prompt=True
        )
    sys = "" if system_prompt is None else f"{IM_START}system\n{system_prompt}{IM_END}\n"
    return f"{sys}{IM_START}user\n{problem}{IM_END}\n{IM_START}{ASSISTANT}\n"


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` as inference tokenizes a rendered prompt: no BOS/EOS added (the template
    wrote what it wants); ``verbose=False`` because long training traces exceed ``model_max_length``
    on purpose (lengths are enforced elsewhere)."""
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def generation_prompt_ids(tokenizer: Any, problem: str, system_prompt: str | None = None) -> list[int]:
    """Token ids of :func:`generation_prompt_text`: what every generator is given for ``problem``."""
    return encode_text(tokenizer, generation_prompt_text(tokenizer, problem, system_prompt))


__all__ = ["chat_messages", "encode_text", "generation_prompt_ids", "generation_prompt_text"]
