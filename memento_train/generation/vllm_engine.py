"""vLLM adapter: :class:`VLLMEngine` samples with physical block eviction on the Memento vLLM overlay.

Needs vLLM 0.13 with the Memento block-masking overlay (``microsoft/memento``, ``vllm/``:
``pip install vllm==0.13.0`` then ``bash install_overlay.sh``), which adds the ``block_masking_config``
engine argument. Stock vLLM lacks it and is refused with a clear error: the reference engine
(``memento_train.generation.ReferenceGenerator``) runs without it. ``vllm`` is imported lazily, so
this module imports (and its tests run) on CPU machines without vLLM.

What the adapter fixes, and why:

- ``enable_prefix_caching=False``: a prefix-cache hit would hand a new request KV entries of blocks
  another request already evicted (the overlay does not turn it off itself).
- ``block_masking_config`` is :meth:`BlockMaskingConfig.to_dict` (the overlay's field names), with
  ``max_block_tokens=None`` sent as the overlay's ``0`` (= no cap); a cap also sets
  ``async_scheduling=False``, which the overlay's block-length-cap logits processor requires.
- Requests: ``TokensPrompt``-shaped dicts; ``skip_special_tokens=False``; ``logprobs=1`` (the sampled
  token's log-prob is always returned); ``ignore_eos=True`` with explicit ``stop_token_ids``:
  ``params.stop_token_ids``, or when empty the tokenizer's EOS (``<|im_end|>`` for a mapping), the
  same stop set as the reference engine (vLLM would otherwise add generation-config EOS ids);
  our ``top_k=0`` (off) is sent as vLLM's ``-1``.
- Log-probs (``logprobs_mode``, an *engine* setting in vLLM >= 0.10.2; the docs of
  ``vllm.v1.sample.sampler.Sampler``): ``raw_logprobs`` (vLLM's default) is ``log_softmax(logits)``
  taken before any processing (no temperature, no penalties, no logits processors, no truncation);
  ``processed_logprobs`` is taken after penalties, logits processors, temperature, min-p and
  top-k/top-p, i.e. renormalised over the kept tokens. Our definition (:class:`GenerationResult`) is
  ``log_softmax(logits / T)`` before truncation. So ``raw_logprobs`` (the default here) is exact for
  ``T == 1`` and greedy, with or without truncation, and also gives a forced ``<|block_end|>`` its
  model log-prob, which is what the trainer recomputes; ``processed_logprobs`` is exact for any ``T``
  only without truncation (``top_k=0, top_p=1, min_p=0``), and reports 0.0 for forced tokens. Each
  result records ``extra["logprobs_exact"]``; an inexact combination also warns.
- ``kinds`` and ``kv_trace`` are *simulated*: :func:`memento_train.masking.parse` over
  prompt + response with ``block_masking.mask_config()`` and ``prompt_len=len(prompt)``, the rule the
  overlay applies (``kv_bytes`` stays None). ``kv_trace[i]`` is the live entries per layer after the
  forward that produced token ``i`` (row ``len(prompt) + i - 1``). ``forced_block_ends`` is read from
  the output if the overlay ever reports it, else replayed from the overlay's cap rule.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import fields, is_dataclass
from typing import Any

from ..hf_compat import check_served_rope_theta
from ..masking import SpecialTokens, live_kv_trace, parse
from ..tokens import IM_END, special_token_ids
from . import vllm_overlay
from .engine import BlockMaskingConfig, GenerationResult, SamplingParams
from .reference import SequenceRequest
from .sampling import derive_seed, random_seed

LOGPROBS_MODES = ("raw_logprobs", "processed_logprobs")
_INSTALL_HINT = (
    "install vLLM 0.13 with `pip install 'memento-train[vllm]'` (vllm==0.13.0) and apply the Memento "
    "block-masking overlay (github.com/microsoft/memento, vllm/install_overlay.sh)"
)
_REFERENCE_HINT = (
    "the reference engine (memento_train.generation.ReferenceGenerator) generates with the same "
    "eviction rule without vLLM"
)


def check_vllm_block_masking() -> str:
    """Return the installed vLLM version if it accepts ``block_masking_config``; else raise RuntimeError.

    Looks at signatures only (``vllm.LLM.__init__``, then the ``vllm.engine.arg_utils.EngineArgs``
    dataclass fields), so no model or GPU is touched.
    """
    try:
        import vllm
    except ImportError as exc:
        raise RuntimeError(f"vLLM is not installed: {_INSTALL_HINT}; {_REFERENCE_HINT}") from exc
    version = str(getattr(vllm, "__version__", "unknown"))
    if _accepts_block_masking(vllm):
        return version
    raise RuntimeError(
        f"the installed vLLM {version} has no block masking (no `block_masking_config` engine "
        f"argument): VLLMEngine needs vLLM 0.13 + the Memento block-masking overlay; {_INSTALL_HINT}. "
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


def _load_weights_on_worker(worker: Any, weights: list) -> int:
    """Runs inside each vLLM worker (via ``collective_rpc``): the model's own loader shards for TP."""
    worker.model_runner.model.load_weights(weights=weights)
    return len(weights)


class VLLMEngine:
    """:class:`~memento_train.generation.engine.GenerationEngine` over vLLM's offline ``LLM``.

    ``tokenizer``: None (use the model's), a path (passed to vLLM), a tokenizer object, or a mapping of
    special-token ids; it only serves to find the memento/ChatML ids for the simulated KV trace.
    ``llm_factory(**kwargs)`` / ``sampling_params_factory(**kwargs)`` replace ``vllm.LLM`` /
    ``vllm.SamplingParams`` (tests inject fakes; the vLLM check is then skipped). The LLM object must
    offer ``generate(prompts, sampling_params, use_tqdm=...)`` and ``get_tokenizer()``.
    ``enable_weight_sync`` sets ``VLLM_ALLOW_INSECURE_SERIALIZATION=1`` (if unset) before the engine
    starts, which :meth:`update_weights` needs with vLLM's multiprocess engine core.
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
        if "block_masking_config" in llm_kwargs:
            raise ValueError("pass the eviction options as `block_masking`, not block_masking_config")
        self.block_masking = block_masking
        self.logprobs_mode = logprobs_mode
        self.vllm_version = None if llm_factory is not None else check_vllm_block_masking()
        if llm_factory is None:
            from vllm import LLM as llm_factory  # noqa: N811
        if sampling_params_factory is None:
            try:
                from vllm import SamplingParams as sampling_params_factory  # noqa: N811
            except ImportError as exc:
                raise ValueError("pass sampling_params_factory with llm_factory when vLLM is absent") from exc
        self._sampling_params_factory = sampling_params_factory
        if enable_weight_sync:
            os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")

        bm = block_masking.to_dict()
        bm["max_block_tokens"] = bm["max_block_tokens"] or 0  # the overlay's "no cap"
        kwargs: dict[str, Any] = dict(
            model=str(model_path), dtype=dtype, tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization, seed=seed, logprobs_mode=logprobs_mode,
            block_masking_config=bm,
        )
        if max_model_len is not None:
            kwargs["max_model_len"] = max_model_len
        if isinstance(tokenizer, (str, os.PathLike)):
            kwargs["tokenizer"] = str(tokenizer)
        if block_masking.enable and block_masking.max_block_tokens:
            kwargs["async_scheduling"] = False  # the cap processor needs real ids, not placeholders
        kwargs.update(llm_kwargs)
        kwargs["enable_prefix_caching"] = False
        # vLLM 0.13 + overlay: the project's runtime patch layer (see memento_train.generation.vllm_overlay).
        self.overlay = vllm_overlay.applies(self.vllm_version)
        if self.overlay:
            kwargs = vllm_overlay.engine_kwargs(kwargs)
        self.llm_kwargs = kwargs
        if self.vllm_version is not None:  # real vLLM: refuse a RoPE base it would misread, before loading
            check_served_rope_theta(model_path)
        self.llm = llm_factory(**kwargs)

        if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = self.llm.get_tokenizer()
        if isinstance(tokenizer, Mapping):
            ids, eos = tokenizer, tokenizer.get(IM_END)
        else:
            ids = special_token_ids(tokenizer)
            eos = getattr(tokenizer, "eos_token_id", None)
            eos = ids[IM_END] if eos is None else eos
        self.special = SpecialTokens.from_mapping(ids)
        self.default_stop: tuple[int, ...] = () if eos is None else (int(eos),)
        self._mask_config = block_masking.mask_config()

    # -- sampling ---------------------------------------------------------------------------
    def sampling_params(self, params: SamplingParams, *, n: int | None = None, seed: int | None = None) -> Any:
        """The vLLM ``SamplingParams`` for ``params`` (``n`` / ``seed`` override the params' own)."""
        return self._sampling_params_factory(
            n=params.n if n is None else n, temperature=params.temperature, top_p=params.top_p,
            top_k=params.top_k if params.top_k > 0 else -1, min_p=params.min_p,
            seed=params.seed if seed is None else seed, max_tokens=params.max_new_tokens,
            stop_token_ids=list(params.stop_token_ids or self.default_stop), ignore_eos=True, logprobs=1,
            skip_special_tokens=False,
        )

    def logprobs_exact(self, params: SamplingParams) -> bool:
        """Whether vLLM's log-probs equal ``log_softmax(logits / T)`` before truncation for ``params``."""
        if self.logprobs_mode == "raw_logprobs":
            return params.temperature in (0.0, 1.0)
        return params.top_k == 0 and params.top_p == 1.0 and params.min_p == 0.0

    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams
    ) -> list[list[GenerationResult]]:
        """``params.n`` results per prompt, in prompt order (see :class:`GenerationEngine`)."""
        prompts = [[int(t) for t in p] for p in prompts]
        if any(not p for p in prompts):
            raise ValueError("every prompt needs at least one token")
        if self.overlay:  # one request per sample, seeded like the reference engine's sequences
            flat = self.run([SequenceRequest(p, prompt_index=i, sample_index=s)
                             for i, p in enumerate(prompts) for s in range(params.n)], params)
            return [flat[i * params.n:(i + 1) * params.n] for i in range(len(prompts))]
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
            results.append([self._convert(prompt, c, exact) for c in completions])
        return results

    def run(self, requests: Sequence[SequenceRequest], params: SamplingParams) -> list[GenerationResult]:
        """One result per request (vLLM 0.13 + overlay), what ``RolloutWorker`` calls.

        ``request.seed`` (else ``derive_seed(params.seed, prompt_index, sample_index)``, the reference
        engine's rule) seeds each request, so seeded sampling reproduces the reference engine token for
        token; ``max_new_tokens`` overrides the params'. Each result carries the engine's own log:
        the evictions it executed and the physical KV length of every step (``extra["kv_trace"] ==
        "engine"``).
        """
        if not self.overlay:
            raise NotImplementedError("VLLMEngine.run needs vLLM 0.13 + the Memento overlay; use generate")
        if any(len(r.forced_token_ids) for r in requests):
            raise NotImplementedError("teacher-forced prefixes are not supported by VLLMEngine; use "
                                      "ReferenceGenerator.teacher_force")
        exact = self._check_logprobs(params)
        base = params.seed if params.seed is not None else random_seed()
        prompts, sps = [], []
        for r in requests:
            prompt = [int(t) for t in r.prompt_ids]
            if not prompt:
                raise ValueError("every prompt needs at least one token")
            seed = r.seed if r.seed is not None else derive_seed(base, r.prompt_index, r.sample_index)
            one = params if r.max_new_tokens is None else dataclasses.replace(params, max_new_tokens=r.max_new_tokens)
            prompts.append(prompt)
            sps.append(self.sampling_params(one, n=1, seed=None if params.greedy else seed))
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], sps, use_tqdm=False)
        if len(outputs) != len(prompts):
            raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(prompts)} requests")
        measured = vllm_overlay.drain_measurements(self.llm, outputs)
        results = []
        for prompt, out, m in zip(prompts, outputs, measured):
            [completion] = out.outputs
            results.append(self._convert(prompt, completion, exact, m))
        return results

    def _check_logprobs(self, params: SamplingParams) -> bool:
        exact = self.logprobs_exact(params)
        if not exact:
            warnings.warn(
                f"logprobs_mode={self.logprobs_mode!r} with temperature={params.temperature}, "
                f"top_k={params.top_k}, top_p={params.top_p}, min_p={params.min_p}: vLLM's log-probs "
                "differ from log_softmax(logits / T) before truncation (see memento_train.generation."
                "vllm_engine)", stacklevel=3,
            )
        return exact

    def _convert(self, prompt: list[int], completion: Any, exact: bool,
                 measured: vllm_overlay.EngineMeasurement | None = None) -> GenerationResult:
        token_ids = [int(t) for t in completion.token_ids]
        if completion.finish_reason not in ("stop", "length"):
            raise RuntimeError(f"vLLM request finished with {completion.finish_reason!r}")
        if completion.logprobs is None or len(completion.logprobs) != len(token_ids):
            raise RuntimeError("vLLM returned no (or misaligned) log-probs although logprobs=1 was requested")
        logprobs = [float(completion.logprobs[i][tok].logprob) for i, tok in enumerate(token_ids)]
        n_prompt = len(prompt)
        parsed = parse([*prompt, *token_ids], self.special, self._mask_config, prompt_len=n_prompt)
        trace = live_kv_trace(parsed.kill_row)[n_prompt - 1 : n_prompt - 1 + len(token_ids)].tolist()
        extra: dict[str, Any] = {"kv_trace": "simulated"}
        if measured is not None:  # what the engine did, not what the rule predicts
            if len(measured.kv_trace) < len(token_ids):
                raise RuntimeError(f"vLLM's engine log has {len(measured.kv_trace)} sampled steps for "
                                   f"{len(token_ids)} tokens: are the Memento patches loaded in the engine?")
            trace = measured.kv_trace[: len(token_ids)]
            extra = {"kv_trace": "engine", "evictions": list(measured.evictions)}
        forced = getattr(completion, "forced_block_ends", None)
        if forced is None:
            cap = self.block_masking.max_block_tokens if self.block_masking.enable else None
            forced = replay_block_cap(prompt, token_ids, self.special, cap) if cap else 0
        return GenerationResult(
            prompt_ids=prompt, token_ids=token_ids, logprobs=logprobs,
            kinds=parsed.kinds[n_prompt:].tolist(), kv_trace=trace,
            finish_reason=completion.finish_reason, kv_bytes=None, forced_block_ends=int(forced),
            extra={
                **extra, "engine": "vllm", "logprobs_mode": self.logprobs_mode,
                "logprobs_exact": exact, "stop_reason": getattr(completion, "stop_reason", None),
                "text": getattr(completion, "text", None), "anomalies": len(parsed.anomalies),
            },
        )

    # -- RL weight sync ---------------------------------------------------------------------
    def update_weights(self, named_tensors: Iterable[tuple[str, Any]]) -> None:
        """Load HF-named tensors into every vLLM worker (``model.load_weights``; TP shards itself).

        Goes through ``LLM.collective_rpc`` with a function that runs on each worker; tensors are
        copied to CPU to cross the process boundary (simple, not fast: NCCL broadcast comes later).
        Needs ``enable_weight_sync=True`` (``VLLM_ALLOW_INSECURE_SERIALIZATION``) with the
        multiprocess engine core. Prefix caching is off, so no stale cached KV survives the update.
        """
        rpc = getattr(self.llm, "collective_rpc", None)
        if rpc is None:
            raise NotImplementedError(
                "this vLLM build has no LLM.collective_rpc; in-place weight updates need vLLM >= 0.8 "
                "(the Memento overlay is 0.13); reload the engine from a checkpoint instead"
            )
        weights = [(name, t.detach().to("cpu").contiguous()) for name, t in named_tensors]
        # Inside a partial the tensors are cloudpickled with the function; as collective_rpc `args` the
        # multiprocess engine core's msgpack encoder would turn them into nested lists.
        rpc(functools.partial(_load_weights_on_worker, weights=weights))


def replay_block_cap(prompt: Sequence[int], response: Sequence[int], special: SpecialTokens, cap: int) -> int:
    """Count the ``<|block_end|>`` tokens the overlay's block-length cap forced into ``response``.

    Mirrors ``BlockLengthCapLogitsProcessor``: scanning prompt then response, ``<|block_start|>``
    opens a block and resets the count, ``<|block_end|>`` closes it, other non-delimiter tokens inside
    a block count; a response token sampled while the count is ``>= cap`` was forced.
    """
    delims = {special.block_start, special.block_end, special.summary_start, special.summary_end}
    in_block, count, forced = False, 0, 0
    for pos, tok in enumerate([*prompt, *response]):
        if pos >= len(prompt) and in_block and count >= cap and tok == special.block_end:
            forced += 1
        if tok == special.block_start:
            in_block, count = True, 0
        elif tok == special.block_end:
            in_block, count = False, 0
        elif in_block and tok not in delims:
            count += 1
    return forced
