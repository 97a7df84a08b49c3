"""Token-id layout of the synthetic streams used by masking and parity tests.

The same ids as ``shared/fixtures/eviction_cases.json``, inside a vocabulary of 128.
"""

IM_START, ASSISTANT, IM_END, USER, NL = 1, 2, 3, 4, 5
BS, BE, SS, SE, THINK, ETHINK = 10, 11, 12, 13, 14, 15
SPECIAL = {
    "<|im_start|>": IM_START,
    "assistant": ASSISTANT,
    "<|im_end|>": IM_END,
    "user": USER,
    "<|block_start|>": BS,
    "<|block_end|>": BE,
    "<|summary_start|>": SS,
    "<|summary_end|>": SE,
    "<think>": THINK,
    "</think>": ETHINK,
}
