"""Weight sync from the trainer workers to the rollout workers, timed.

CPU (and the default everywhere in this version): trainer rank 0 gathers the full fp32 weights
(``engine.full_state_dict()``, a collective over the trainer ranks). Returned from a Ray actor, that
dict is stored once in the Ray object store; each rollout actor receives the object *reference* and
Ray hands it the weights from the store (zero-copy on the same node), so the driver never holds a
copy. Inline (``use_ray=false``) the dict is passed directly. Each rollout worker then copies the
tensors into its model in place (``load_state_dict``).

GPU paths, configured by ``weight_sync`` but not implemented here (the config rejects them):
``nccl`` — trainer rank 0 broadcasts each tensor to the disaggregated rollout GPUs over an NCCL group
spanning both pools; ``inplace`` — colocated vLLM engines load the gathered tensors in the same
process without leaving the GPU.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from memento_train.cluster import WorkerGroup
from memento_train.rl.rollout_worker import RolloutPool


@dataclass
class SyncStats:
    """What one sync cost: gather on the trainer, load on the rollout workers, their total."""

    gather_s: float
    load_s: float
    total_s: float
    method: str = "object_store"

    def metrics(self) -> dict[str, float]:
        return {"time/sync_s": self.total_s, "sync/gather_s": self.gather_s, "sync/load_s": self.load_s}


def sync_weights(trainer: WorkerGroup, pool: RolloutPool, version: int) -> SyncStats:
    """Push the trainer's current weights into every rollout worker (tagged ``version``)."""
    t0 = time.perf_counter()
    pending = trainer.run_async("full_weights")
    if trainer.cfg.use_ray:
        import ray

        # Wait for the collective on every rank, but only fetch the (None) results of ranks > 0: rank 0's
        # weights stay in the object store and travel to the rollout actors by reference.
        ray.wait(list(pending), num_returns=len(pending))
        trainer.get(type(pending)(pending[1:], pending.method, trainer)) if len(pending) > 1 else None
        weights = pending[0]
    else:
        weights = trainer.get(pending)[0]
    gathered = time.perf_counter()
    load_s = pool.load_weights(weights, version)
    total = time.perf_counter() - t0
    return SyncStats(gather_s=gathered - t0, load_s=load_s, total_s=total)
