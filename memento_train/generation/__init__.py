"""Generation with physical KV eviction: the reference for what the serving engine computes.

- :mod:`.engine` — the contract: :class:`SamplingParams`, :class:`BlockMaskingConfig`,
  :class:`GenerationResult`, :class:`GenerationEngine`;
- :mod:`.teacher_forced` — :class:`EvictingDecoder` (model + cache + block tracker, ``step(token)``)
  and :func:`teacher_forced_logits`, the decode side of the training/serving parity test;
- :mod:`.batched_cache` — :class:`BatchedEvictingCache` (ragged rows of compacted K/V with logical
  positions; per-row eviction physically frees entries) and the ``memento_decode_batched`` HF
  attention function; the parity decoder and the reference engine both run on it;
- :mod:`.prompt` — :func:`generation_prompt_ids`, the one rendering of a problem into the prompt
  every generator (and the data renderer) uses;
- :mod:`.sampling` — temperature / top-k / top-p / min-p with per-sequence seeded generators;
- :mod:`.reference` — :class:`ReferenceGenerator`, the batched reference engine;
- :mod:`.vllm_engine` — :class:`VLLMEngine`, the same interface over real vLLM: vLLM 0.32 with this
  package's plugin (:mod:`memento_train.serving`) or vLLM 0.13 with the Memento overlay (vLLM is
  imported only when an engine is built).
"""

from memento_train.generation.batched_cache import (
    BATCHED_DECODE_ATTN,
    BatchedEvictingCache,
    batched_decode_attention,
    register_batched_decode_attention,
)
from memento_train.generation.engine import BlockMaskingConfig, GenerationEngine, GenerationResult, SamplingParams
from memento_train.generation.prompt import generation_prompt_ids, generation_prompt_text
from memento_train.generation.reference import ReferenceGenerator, SequenceRequest
from memento_train.generation.sampling import derive_seed, filter_logits, make_generator, sample_next, token_logprobs
from memento_train.generation.teacher_forced import EvictingDecoder, KVTrace, teacher_forced_logits
from memento_train.generation.vllm_engine import VLLMEngine, check_vllm_block_masking

__all__ = [
    "BATCHED_DECODE_ATTN",
    "BatchedEvictingCache",
    "BlockMaskingConfig",
    "EvictingDecoder",
    "GenerationEngine",
    "GenerationResult",
    "KVTrace",
    "ReferenceGenerator",
    "SamplingParams",
    "SequenceRequest",
    "VLLMEngine",
    "batched_decode_attention",
    "check_vllm_block_masking",
    "derive_seed",
    "filter_logits",
    "generation_prompt_ids",
    "generation_prompt_text",
    "make_generator",
    "register_batched_decode_attention",
    "sample_next",
    "teacher_forced_logits",
    "token_logprobs",
]
