"""vLLM workers that run the Memento model runner (``worker_cls`` engine argument).

vLLM builds its model runner inside the worker; these subclasses make it build
:class:`~.model_runner.MementoRunnerMixin` in front of the V1 runner. The GPU worker refuses vLLM's
second model runner ("V2", vLLM 0.32's default on GPUs with Triton): the plugin patches the V1
runner, and :func:`memento_train.serving.plugin_engine_args` pins ``VLLM_USE_V2_MODEL_RUNNER=0``.
"""

from __future__ import annotations

import contextlib

import vllm.v1.worker.cpu_worker as cpu_worker_module
from vllm.v1.worker.cpu_model_runner import CPUModelRunner
from vllm.v1.worker.cpu_worker import CPUWorker
from vllm.v1.worker.gpu_model_runner import GPUModelRunner
from vllm.v1.worker.gpu_worker import Worker

from memento_train.serving.model_runner import MementoRunnerMixin

V2_REFUSED = (
    "the Memento vLLM plugin patches vLLM's V1 model runner, but this engine selected the V2 runner; "
    "set VLLM_USE_V2_MODEL_RUNNER=0 before the engine starts (memento_train.serving.plugin_engine_args "
    "and memento-serve do)"
)


class MementoCPUModelRunner(MementoRunnerMixin, CPUModelRunner):
    """vLLM's CPU model runner with Memento compaction."""


class MementoGPUModelRunner(MementoRunnerMixin, GPUModelRunner):
    """vLLM's V1 GPU model runner with Memento compaction."""


class MementoCPUWorker(CPUWorker):
    """CPU worker building :class:`MementoCPUModelRunner`."""

    def init_device(self) -> None:
        if self.use_v2_model_runner:
            raise RuntimeError(V2_REFUSED)
        # CPUWorker.init_device constructs the runner by this module-level name.
        with _swapped(cpu_worker_module, "CPUModelRunner", MementoCPUModelRunner):
            super().init_device()


class MementoGPUWorker(Worker):
    """GPU worker building :class:`MementoGPUModelRunner`."""

    def _make_model_runner(self) -> GPUModelRunner:
        if self.use_v2_model_runner:
            raise RuntimeError(V2_REFUSED)
        return MementoGPUModelRunner(self.vllm_config, self.device)


@contextlib.contextmanager
def _swapped(module, name: str, value):
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)
