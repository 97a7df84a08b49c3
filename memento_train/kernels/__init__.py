"""Triton block-causal varlen attention for memento masks (backend ``triton``).

``visible(q, k) = same_doc ∧ k ≤ q ∧ q < kill_row[k]`` (∧ ``q - k < window``), forward and
backward, GQA, bf16/fp16 (fp32 for tests), head dims 16–128. Tiles whose keys are all dead for a
whole query tile, or outside its document, are never visited (:mod:`.tiles`), so the work follows
the pairs the mask keeps rather than the causal triangle.

Modules: :mod:`.tiles` (tile skip metadata, pure PyTorch), :mod:`.tile_ops` (device functions the
kernels share: tile loads/stores, the mask), :mod:`.forward` / :mod:`.backward` (the Triton
kernels), :mod:`.function` (autograd Function, configs, availability), :mod:`.aot` (compile for an
H100 without one: registers, spills, shared memory). Importing this
package does not import Triton. ``memento_train.attention`` registers the backend lazily, so
``memento_attention(..., backend="triton")`` imports this package on first use.
"""

from memento_train.kernels.function import (
    KernelConfig,
    MementoTritonAttention,
    TritonConfig,
    set_triton_config,
    triton_attention,
    triton_config,
    triton_unavailable_reason,
)
from memento_train.kernels.tiles import TilePlan, build_tile_plan, tile_plan

__all__ = [
    "KernelConfig",
    "MementoTritonAttention",
    "TilePlan",
    "TritonConfig",
    "build_tile_plan",
    "set_triton_config",
    "tile_plan",
    "triton_attention",
    "triton_config",
    "triton_unavailable_reason",
]
