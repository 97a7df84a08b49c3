"""RL trainer workers, and how a step's scored rollouts become packed micro-batches.

:func:`rollout_document` turns one response (prompt ids + sampled ids + the rollout engine's
log-probs) into a training document with the *same* memento mask the rollout used
(:func:`memento_train.masking.parse` over prompt + response gives the kill rows the generator evicted
by), per-token advantages and the rollout log-probs aligned with the shifted labels.
:func:`~memento_train.training.micro_batches.build_micro_batch` packs documents into one
:class:`~memento_train.engines.MicroBatch` whose ``extras`` (:data:`TOKEN_EXTRAS`) are what
:func:`memento_train.rl.losses.make_loss_fn` reads.

:class:`RLTrainerWorker` is one trainer rank. ``train_step`` runs, for this rank's share of a step's
mini-batches: old log-probs of *all* of them first (``engine.forward_only``, when
``algorithm.old_logprobs_source=trainer``: π_old is the policy that generated the rollouts, so it is
read before any update), reference log-probs (when ``algorithm.kl_coef > 0``: the initial policy held
by a second engine of the same kind, precision and sharding as the policy's, whose optimizer is never
stepped, so FSDP2, ZeRO-3 and Megatron run the reference forward exactly as the policy's, through
:meth:`~memento_train.engines.TrainEngine.logits`), then per mini-batch ``forward_backward`` with the RL loss and one
optimizer step, timing each phase. From the second mini-batch on π_θ ≠ π_old and the clip range acts. Rank 0 is also the
sender of the collective weight sync (:mod:`memento_train.rl.collective_sync`): it hosts that group's
store and broadcasts the gathered weights; the other ranks only take part in the gather.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from memento_train.checkpoint.rank_state import seed_everything
from memento_train.config.tree import build
from memento_train.data.pack import IGNORE_INDEX
from memento_train.engines import MicroBatch, build_engine
from memento_train.masking import BlockMaskingConfig, SpecialTokens, parse
from memento_train.rl.collective_sync import Rendezvous, WeightSyncGroup, open_store
from memento_train.rl.config import RLConfig
from memento_train.rl.logprobs import make_logprob_fn
from memento_train.rl.losses import make_loss_fn
from memento_train.training.micro_batches import build_micro_batch
from memento_train.training.worker import EngineWorker

# Per-token arrays a document carries besides the collate() columns; packed in document order.
TOKEN_EXTRAS = ("advantages", "rollout_logprobs", "loss_mask", "loss_weights")


def rollout_document(
    prompt_ids: Sequence[int],
    response_ids: Sequence[int],
    rollout_logprobs: Sequence[float],
    advantage: float,
    special: SpecialTokens,
    mask: BlockMaskingConfig,
    *,
    trained: Sequence[bool] | None = None,
    weight: float = 1.0,
) -> dict[str, np.ndarray]:
    """One training document from one rollout.

    Labels are unshifted here (``-100`` on the prompt); :func:`~memento_train.data.pack.collate`
    shifts them per document, so position ``t`` predicts ``ids[t + 1]``. The per-token extras are
    stored *already shifted the same way*: ``rollout_logprobs[P - 1 + i]`` is the rollout log-prob of
    response token ``i`` (``P`` = prompt length), ``advantages`` is ``advantage`` on exactly those
    positions and 0 elsewhere, ``loss_mask`` is ``trained[i]`` there (default: every response token;
    the driver clears forced block ends, truncated responses, ...) and ``loss_weights`` the
    sequence's aggregation weight ``a_i`` (:func:`~memento_train.rl.losses.aggregation_weights`).
    """
    p, r = len(prompt_ids), len(response_ids)
    if r == 0:
        raise ValueError("a rollout with an empty response cannot be trained on")
    if len(rollout_logprobs) != r:
        raise ValueError(f"{len(rollout_logprobs)} rollout log-probs for {r} response tokens")
    if trained is not None and len(trained) != r:
        raise ValueError(f"{len(trained)} loss-mask flags for {r} response tokens")
    ids = np.concatenate([np.asarray(prompt_ids, np.int64), np.asarray(response_ids, np.int64)])
    parsed = parse(ids, special, mask, prompt_len=p)
    labels = ids.copy()
    labels[:p] = IGNORE_INDEX
    n = p + r
    lp = np.zeros(n, np.float32)
    lp[p - 1 : n - 1] = rollout_logprobs
    adv = np.zeros(n, np.float32)
    adv[p - 1 : n - 1] = advantage
    keep = np.zeros(n, np.float32)
    keep[p - 1 : n - 1] = 1.0 if trained is None else np.asarray(trained, np.float32)
    weights = np.zeros(n, np.float32)
    weights[p - 1 : n - 1] = weight
    return {
        "input_ids": ids,
        "labels": labels,
        "kinds": parsed.kinds.astype(np.int8),
        "kill_row": parsed.kill_row.astype(np.int64),
        "advantages": adv,
        "rollout_logprobs": lp,
        "loss_mask": keep,
        "loss_weights": weights,
    }


class RLTrainerWorker(EngineWorker):
    """One trainer rank: the policy engine, and the reference policy's engine when the KL needs it."""

    def __init__(self, config_tree: dict[str, Any]) -> None:
        self.tree = config_tree
        self.cfg: RLConfig = build(RLConfig, config_tree)

    def setup(self) -> dict[str, Any]:
        from memento_train.models.loading import load_model, run_tokenizer

        cfg = self.cfg
        seed_everything(cfg.seed)
        self.tokenizer = run_tokenizer(cfg.model)
        model = load_model(cfg.model, self.tokenizer, seed=cfg.seed)
        self.model_config = model.config
        self.engine = build_engine(model, cfg.optim, cfg.engine, self.device)
        self.ref_engine = None
        if cfg.algorithm.uses_reference:
            # The initial weights again, sharded and cast like the policy (an unsharded fp32 copy per rank
            # would not fit next to a 32B policy, and flash-attn refuses fp32). Only forward_only ever
            # runs on it: no gradients, and its optimizer state is never allocated (AdamW builds it
            # lazily on the first step, which never comes).
            ref = load_model(cfg.model, self.tokenizer, seed=cfg.seed)
            self.ref_engine = build_engine(ref, cfg.optim, cfg.engine, self.device)
            self.ref_engine.eval()
        self.pad_id = self.tokenizer.pad_token_id or 0
        return {"rank": self.rank, "num_params": sum(p.numel() for p in model.parameters()), "device": str(self.device)}

    # -- the step --------------------------------------------------------------------------------
    def train_step(
        self, mini_batches: list[list[list[dict[str, np.ndarray]]]], normalisers: list[float], lr: float
    ) -> dict[str, Any]:
        """One optimizer step per mini-batch (``train.mini_batches``), each over this rank's micro-batches
        of documents. ``normalisers[k]`` is mini-batch ``k``'s over all ranks. Returns per-micro-batch
        loss metrics of every mini-batch (for :func:`~memento_train.rl.losses.reduce_metrics`), the
        grad norm of each optimizer step and the phase times (summed over mini-batches)."""
        if len(mini_batches) != len(normalisers):
            raise ValueError(f"{len(mini_batches)} mini-batches but {len(normalisers)} normalisers")
        cfg = self.cfg
        temperature = cfg.rollout.temperature
        batches = [[self._micro_batch(d) for d in micro_docs] for micro_docs in mini_batches]
        flat = [mb for mini in batches for mb in mini]
        times: dict[str, float] = {}
        t0 = time.perf_counter()
        if cfg.algorithm.old_logprobs_source == "trainer":
            for mb, lp in zip(flat, self._logprobs(self.engine, flat)):
                mb.extras["old_logprobs"] = lp
        times["old_logprobs_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        if self.ref_engine is not None:
            for mb, lp in zip(flat, self._logprobs(self.ref_engine, flat)):
                mb.extras["ref_logprobs"] = lp
        times["ref_logprobs_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        self.engine.train()
        metrics, grad_norms = [], []
        for mini, normaliser in zip(batches, normalisers):
            loss_fn = make_loss_fn(cfg.algorithm, normaliser, temperature=temperature)
            metrics.extend(self.engine.forward_backward(mini, loss_fn))
            grad_norms.append(float(self.engine.step(lr)))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        times["update_s"] = time.perf_counter() - t0
        plain = [{k: float(v) for k, v in m.items()} for m in metrics]
        return {"metrics": plain, "grad_norms": grad_norms, "times": times}

    def _micro_batch(self, docs: Sequence[Mapping[str, np.ndarray]]) -> MicroBatch:
        """``docs`` (from :func:`rollout_document`) packed into one micro-batch whose ``extras`` are what
        :func:`memento_train.rl.losses.make_loss_fn` reads; no docs = a padding micro-batch."""
        return build_micro_batch(docs, pad_token_id=self.pad_id, device=self.device, token_extras=TOKEN_EXTRAS)[0]

    def _logprobs(self, engine, batches: list[MicroBatch]) -> list[torch.Tensor]:
        """``engine``'s log-probs of every micro-batch's labels at the rollout temperature (no grad)."""
        engine.eval()
        fn = make_logprob_fn(temperature=self.cfg.rollout.temperature, chunk_size=self.cfg.algorithm.logprob_chunk_size)
        return engine.forward_only(batches, fn)

    def policy_logprobs(self, micro_docs: list[list[dict[str, np.ndarray]]]) -> list[np.ndarray]:
        """The policy's log-probs of each micro-batch of documents (from :func:`rollout_document`),
        computed exactly as ``train_step`` computes π_old: packed, memento-masked, engine forward. Entry
        ``t`` is the log-prob of token ``t + 1`` of its document (0 where there is no label)."""
        batches = [self._micro_batch(d) for d in micro_docs]
        return [lp.float().cpu().numpy() for lp in self._logprobs(self.engine, batches)]

    # -- weights and checkpoints -------------------------------------------------------------------
    def full_weights(self) -> dict[str, torch.Tensor] | None:
        """Collective: the full fp32 CPU weights on rank 0 (``None`` elsewhere) for the weight sync.
        Returned from a Ray actor, the dict lands in the object store; rollout workers read it there."""
        return self.engine.full_state_dict()

    # -- collective weight sync (rank 0 sends; see memento_train.rl.weight_sync) ---------------------
    def open_weight_sync(self, store_timeout_s: float) -> dict[str, Any] | None:
        """Rank 0: start the weight-sync group's own TCPStore (once; kept across group rebuilds) on an
        OS-assigned port of this node; returns ``{"host", "port"}``. ``None`` on other ranks."""
        if self.rank != 0:
            return None
        if getattr(self, "_ws_store", None) is None:
            host = _node_ip()
            self._ws_store = open_store(host, store_timeout_s)
            self._ws_host = host
        return {"host": self._ws_host, "port": self._ws_store.port}

    def join_weight_sync(self, rdv: Rendezvous) -> None:
        """Rank 0: join the weight-sync group as its rank 0 (blocks until every rollout worker has
        joined). Other ranks have nothing to do: they are not members."""
        if self.rank != 0:
            return
        self.close_weight_sync()
        self._ws_group = WeightSyncGroup(rdv, 0, store=self._ws_store, device=self.device)

    def send_weights(self, version: int) -> dict[str, float]:
        """Collective over the trainer ranks (the full-state gather); then rank 0 broadcasts the weights
        to the rollout workers. Returns ``gather_s`` (every rank) and rank 0's broadcast timings."""
        t0 = time.perf_counter()
        state = self.engine.full_state_dict()
        out = {"gather_s": time.perf_counter() - t0, "version": float(version)}
        if self.rank == 0:
            group = getattr(self, "_ws_group", None)
            if group is None:
                raise RuntimeError("send_weights: trainer rank 0 has not joined the weight-sync group")
            out.update(group.send(state))
        return out

    def close_weight_sync(self, close_store: bool = False) -> None:
        """Leave the weight-sync group (and with ``close_store`` stop its store). Idempotent."""
        group = getattr(self, "_ws_group", None)
        self._ws_group = None
        if group is not None:
            group.close()
        if close_store:
            self._ws_store = None


def _node_ip() -> str:
    """This node's address as Ray sees it (what the rollout workers can reach); localhost without Ray."""
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except ImportError:
        pass
    return "127.0.0.1"
