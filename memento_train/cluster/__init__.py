"""Running workers on a Ray cluster (or inline), verl/OpenRLHF single-controller style.

* :class:`ClusterConfig` — resources, placement and rendezvous options of a worker group;
* :class:`DistributedWorker` — base class of worker actors (rank, world size, device, process group);
* :class:`WorkerGroup` — the driver's handle: ``run`` / ``run_each`` / ``run_async`` on all ranks;
* :class:`WorkerError` — a worker method raised or a worker died.
"""

from memento_train.cluster.config import ClusterConfig
from memento_train.cluster.worker import DistributedWorker
from memento_train.cluster.worker_group import AsyncResults, WorkerError, WorkerGroup

__all__ = ["AsyncResults", "ClusterConfig", "DistributedWorker", "WorkerError", "WorkerGroup"]
