"""The SFT trainer worker: one rank's model shard, engine and data view.

The driver (:mod:`memento_train.sft.driver`) decides everything step by step (which examples, the
learning rate, when to save); a worker only executes: ``setup`` once, then ``train_step`` with its share
of the step plan, ``save``/``load`` into checkpoint directories and ``export_hf`` at the end.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from memento_train.checkpoint.rank_state import seed_everything
from memento_train.data.prepared import load_examples
from memento_train.engines import build_engine
from memento_train.masking import Kind
from memento_train.models.loading import load_model, run_tokenizer
from memento_train.sft.config import SFTConfig, build_sft_config
from memento_train.sft.losses import sft_loss_fn
from memento_train.training.flops import FlopCounter
from memento_train.training.micro_batches import build_micro_batch
from memento_train.training.worker import EngineWorker

_COLUMNS = ("input_ids", "labels", "kinds", "kill_row")


class SFTWorker(EngineWorker):
    """One SFT rank. Built from the config *tree* (plain data travels to Ray actors cheaply)."""

    def __init__(self, config_tree: dict[str, Any]) -> None:
        self.tree = config_tree
        self.cfg: SFTConfig = build_sft_config(config_tree)

    def setup(self) -> dict[str, Any]:
        """Load tokenizer, data (the driver-rendered cache or ``data.prepared``) and model; build the engine."""
        import datasets

        datasets.disable_progress_bars()  # the driver already showed them while preparing the cache
        cfg = self.cfg
        seed_everything(cfg.train.seed)
        self.tokenizer = run_tokenizer(cfg.model)
        dataset, _ = load_examples(cfg.data, self.tokenizer, cfg.model.tokenizer or cfg.model.path)
        if cfg.train.max_samples is not None:
            dataset = dataset.select(range(min(cfg.train.max_samples, len(dataset))))
        self.dataset = dataset.select_columns(list(_COLUMNS)).with_format("numpy")
        # Rank 0 reads the weights; the others build on meta and get their share from the engine.
        model = load_model(cfg.model, self.tokenizer, seed=cfg.train.seed, rank=self.rank)
        self.model_config = model.config
        self.flops = FlopCounter(model)
        num_params = sum(p.numel() for p in model.parameters())
        self.engine = build_engine(model, cfg.optim, cfg.engine, self.device)
        torch.manual_seed(cfg.train.seed + 1000 * self.rank)  # per-rank stream for dropout and the like
        # Tensor/pipeline-parallel ranks of one model replica must see the same micro-batches: the
        # driver deals the plan out by data-parallel rank (the world rank for data-parallel engines).
        return {
            "rank": self.rank,
            "num_params": num_params,
            "device": str(self.device),
            "dp_rank": getattr(self.engine, "dp_rank", self.rank),
            "device_name": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu",
        }

    def _rows(self, indices: list[int]) -> list[dict[str, np.ndarray]]:
        if not indices:
            return []
        chunk = self.dataset[indices]
        return [{c: chunk[c][j] for c in _COLUMNS} for j in range(len(indices))]

    def _micro_batches(self, micro_plan: list[list[int]]):
        batches, packed = [], []
        for indices in micro_plan:
            mb, pb = build_micro_batch(
                self._rows(indices),
                pad_to=self.cfg.train.pad_to_multiple,
                pad_token_id=self.tokenizer.pad_token_id or 0,
                device=self.device,
            )
            batches.append(mb)
            packed.append(pb if indices else None)
        return batches, packed

    def train_step(
        self, micro_plan: list[list[int]], global_loss_tokens: int, lr: float, hang_s: float = 0.0
    ) -> dict[str, Any]:
        """Forward/backward this rank's micro-batches, then one optimizer step at ``lr``.

        Returns this rank's sums (loss, tokens, pairs, ...); the driver adds them up over ranks.
        ``hang_s`` is the ``faults.inject_hang_at_step`` test hook: sleep that long first, so the
        other ranks wait for this one inside the step's first collective.
        """
        if hang_s:
            time.sleep(hang_s)
        t0 = time.perf_counter()
        batches, packed = self._micro_batches(micro_plan)
        self.engine.train()
        metrics = self.engine.forward_backward(batches, sft_loss_fn(global_loss_tokens))
        grad_norm = self.engine.step(lr)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elapsed = time.perf_counter() - t0
        out = {
            "loss_sum": sum(m["loss_sum"] for m in metrics),
            "grad_norm": float(grad_norm),
            "time_s": elapsed,
            "micro_batches": sum(1 for p in packed if p is not None),
            "tokens": 0,
            "real_tokens": 0,
            "loss_tokens": 0,
            "kept_pairs": 0,
            "causal_pairs": 0,
            "flops": 0.0,
            "blocks": 0,
            "summary_tokens": 0,
            "sequences": 0,
        }
        for mb, pb in zip(batches, packed):
            if pb is None:
                continue
            kept, causal = self.flops.attention_pairs(mb.meta)
            kinds = pb.kinds
            out["tokens"] += pb.num_tokens
            out["real_tokens"] += pb.num_tokens - pb.num_pad
            out["loss_tokens"] += int((pb.labels != -100).sum())
            out["kept_pairs"] += kept
            out["causal_pairs"] += causal
            out["flops"] += self.flops.step_flops(pb.num_tokens, kept)
            # A block is counted at its opening delimiter; summaries by their content tokens.
            out["blocks"] += int(((kinds == Kind.BLOCK_DELIM) & (pb.input_ids == self._block_start_id)).sum())
            out["summary_tokens"] += int((kinds == Kind.SUMMARY).sum())
            out["sequences"] += len(pb.doc_lengths)
        return out

    @property
    def _block_start_id(self) -> int:
        from memento_train.tokens import BLOCK_START

        return self.tokenizer.convert_tokens_to_ids(BLOCK_START)
