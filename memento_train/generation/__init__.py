"""Generation with physical KV eviction: the reference for what the serving engine computes.

- :mod:`.evicting_cache` — :class:`EvictingCache` (compacted per-layer K/V + logical positions,
  entries freed by ``evict``) and the ``memento_decode`` HF attention function;
- :mod:`.teacher_forced` — :class:`EvictingDecoder` (model + cache + block tracker, ``step(token)``)
  and :func:`teacher_forced_logits`, the decode side of the training/serving parity test.
"""

from .evicting_cache import (
    DECODE_ATTN,
    EvictingCache,
    EvictingLayer,
    attn_implementation_set,
    memento_decode_attention,
    register_decode_attention,
)
from .teacher_forced import EvictingDecoder, KVTrace, teacher_forced_logits

__all__ = [
    "DECODE_ATTN",
    "EvictingCache",
    "EvictingDecoder",
    "EvictingLayer",
    "KVTrace",
    "attn_implementation_set",
    "memento_decode_attention",
    "register_decode_attention",
    "teacher_forced_logits",
]
