"""Models whose weights only rank 0 holds: the helpers engines use to give every rank its share.

A trainer rank loads with ``load_model(..., rank=r)`` (:mod:`memento_train.models.loading`): rank 0
gets the weights, every other rank the same module tree with meta parameters. Each engine then
materialises what its rank needs, on its device and in the training dtype, receiving tensors from
rank 0 one at a time, so no rank but 0 ever holds more than its shard plus one full tensor:

- FSDP2 shards the meta model first, then loads rank 0's state dict by broadcast
  (``set_model_state_dict(..., broadcast_from_rank0=True)``: each rank keeps its slice);
- DeepSpeed gives the meta parameters uninitialised storage (:func:`materialize_meta_params`) and
  relies on its own broadcast from rank 0 (ZeRO-2 ``_broadcast_model``, ZeRO-3 ``zero.Init``,
  which partitions each parameter right after receiving it);
- Megatron converts through :class:`BroadcastStateDict`, a mapping that fetches each HF tensor from
  rank 0 when the conversion asks for it, and keeps only its TP slice.

Every function here is collective over the default process group unless it says otherwise.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch
import torch.distributed as dist
from torch import nn


def _comm_device() -> torch.device:
    """Where collective buffers live for the default group (NCCL needs CUDA tensors)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def weights_on_rank0_only(model: nn.Module) -> bool:
    """Collective: whether some rank's ``model`` has meta parameters (rank 0 then holds the weights).

    Raises when rank 0 itself has meta parameters: nobody would have the weights.
    """
    local = any(p.is_meta for p in model.parameters())
    flags = torch.tensor([int(local), int(local and dist.get_rank() == 0)], device=_comm_device())
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    if int(flags[1]):
        raise RuntimeError(
            "rank 0's model has meta parameters: rank 0 must load the weights "
            "(load_model(..., rank=0)); other ranks may build on meta"
        )
    return bool(int(flags[0]))


def take_weights(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """Rank 0: ``model.state_dict()`` (its tensors, no copy), after which the module's parameters move
    to the meta device (the dict keeps the only reference to the weights). Other ranks: ``None``."""
    if dist.get_rank() != 0:
        return None
    state = {k: v.detach() for k, v in model.state_dict().items()}
    params_to_meta(model)
    return state


def params_to_meta(model: nn.Module) -> None:
    """Move every parameter (not buffer) to the meta device, keeping tied parameters tied. Local."""
    _replace_params(model, lambda p: torch.empty_like(p, device="meta"))


def materialize_meta_params(model: nn.Module, device: torch.device | str, dtype: torch.dtype | None = None) -> None:
    """Give every meta parameter uninitialised storage on ``device`` (in ``dtype``, default its own),
    keeping tied parameters tied. Local; the values must come from rank 0 afterwards."""
    _replace_params(model, lambda p: torch.empty_like(p, device=device, dtype=dtype or p.dtype), only_meta=True)


def _replace_params(model: nn.Module, make, *, only_meta: bool = False) -> None:
    done: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is None or (only_meta and not p.is_meta):
                continue
            if id(p) not in done:
                done[id(p)] = nn.Parameter(make(p), requires_grad=p.requires_grad)
            module._parameters[name] = done[id(p)]


def broadcast_from_rank0(value: torch.Tensor | None, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """Collective: rank 0's ``value`` on every rank (CPU tensor of ``shape``/``dtype``)."""
    dev = _comm_device()
    buf = value.to(dev, dtype) if dist.get_rank() == 0 else torch.empty(shape, dtype=dtype, device=dev)
    dist.broadcast(buf, src=0)
    return buf.cpu()


class BroadcastStateDict(Mapping):
    """A read-only state dict whose tensors live on rank 0: ``sd[key]`` is collective (every rank must
    read the same keys in the same order) and returns rank 0's tensor on every rank. Nothing is cached,
    so a reader that keeps only slices holds only slices.

    ``state`` is rank 0's state dict (``None`` on other ranks); keys, shapes and dtypes are broadcast once.
    """

    def __init__(self, state: Mapping[str, torch.Tensor] | None) -> None:
        box = [{k: (tuple(v.shape), v.dtype) for k, v in state.items()} if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(box, src=0)
        self._info: dict[str, tuple[tuple[int, ...], torch.dtype]] = box[0]
        self._state = state

    def __getitem__(self, key: str) -> torch.Tensor:
        shape, dtype = self._info[key]
        return broadcast_from_rank0(self._state[key] if self._state is not None else None, torch.Size(shape), dtype)

    def __iter__(self) -> Iterator[str]:
        return iter(self._info)

    def __len__(self) -> int:
        return len(self._info)
