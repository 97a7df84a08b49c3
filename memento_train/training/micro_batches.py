"""A step's documents -> packed micro-batches per rank -> :class:`~memento_train.engines.MicroBatch`.

Both drivers plan a step the same way (:func:`plan_micro_batches`: best-fit packing under a token
budget, bins dealt largest-first to the least-loaded rank, every rank padded with empty micro-batches to
the same count, since FSDP/ZeRO collectives must line up), and both workers turn their share into
micro-batches with :func:`build_micro_batch`; an empty share becomes :func:`padding_batch`, which keeps
the rank's collectives in step and contributes no gradient.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from memento_train.attention import MementoAttentionMeta
from memento_train.data.pack import IGNORE_INDEX, PackedBatch, collate, plan_bins
from memento_train.engines import MicroBatch


def plan_micro_batches(lengths: Sequence[int], micro_batch_tokens: int, world_size: int) -> list[list[list[int]]]:
    """Per rank, micro-batches of document positions (into ``lengths``): best-fit-decreasing bins of at
    most ``micro_batch_tokens`` tokens, dealt largest first to the rank with the fewest tokens so far,
    every rank padded (with empty micro-batches) to the same count."""
    lengths = [int(n) for n in lengths]
    bins = plan_bins(lengths, micro_batch_tokens)
    bins.sort(key=lambda b: -sum(lengths[i] for i in b))
    per_rank: list[list[list[int]]] = [[] for _ in range(world_size)]
    load = [0] * world_size
    for b in bins:
        r = min(range(world_size), key=lambda i: (load[i], len(per_rank[i]), i))
        per_rank[r].append(list(b))
        load[r] += sum(lengths[i] for i in b)
    depth = max(1, max(len(p) for p in per_rank))
    for p in per_rank:
        p.extend([] for _ in range(depth - len(p)))
    return per_rank


def padding_batch(pad_token_id: int) -> PackedBatch:
    """A one-token micro-batch with no loss: keeps a rank's collectives in step with the others."""
    row = {
        "input_ids": np.array([pad_token_id]),
        "labels": np.array([IGNORE_INDEX]),
        "kinds": np.array([0], np.int8),
        "kill_row": np.array([1]),
    }
    return collate([row])


def build_micro_batch(
    docs: Sequence[Mapping],
    *,
    pad_token_id: int,
    device: torch.device | str,
    pad_to: int = 1,
    token_extras: Sequence[str] = (),
) -> tuple[MicroBatch, PackedBatch]:
    """Pack ``docs`` (rendered examples or RL rollout documents) into one :class:`MicroBatch` on
    ``device``; no docs = :func:`padding_batch`. Returns it and the :class:`PackedBatch` it came from.

    ``extras["labels"]`` holds the per-document shifted labels. Each name in ``token_extras`` is a
    per-token array every document carries *already aligned with the shifted labels* (e.g. the RL
    advantages): they are concatenated in document order as float32, zero on the padding tokens.
    """
    packed = collate(list(docs), pad_to=pad_to, pad_token_id=pad_token_id) if docs else padding_batch(pad_token_id)
    extras = {"labels": packed.labels.to(device)}
    for key in token_extras:
        values = np.concatenate([d[key] for d in docs]) if docs else np.zeros(0, np.float32)
        values = np.pad(values, (0, packed.num_tokens - values.shape[0]))
        extras[key] = torch.from_numpy(values.astype(np.float32)).to(device)
    meta = MementoAttentionMeta.from_packed(packed.cu_seqlens, packed.kill_row, device=device)
    mb = MicroBatch(
        input_ids=packed.input_ids.to(device), position_ids=packed.position_ids.to(device), meta=meta, extras=extras
    )
    return mb, packed
