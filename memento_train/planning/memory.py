"""Per-GPU and host memory of a training configuration, from shapes alone (nothing is loaded).

Every figure is a sum of tensors the code really allocates, counted the way the engines and the
model hold them; the activation terms follow what autograd saves for backward in a Hugging Face
decoder layer (checked against measured peaks on CPU, ``tests/test_planning.py``):

- **weights / master weights / gradients / optimizer state** by engine: FSDP2 (fp32 shards; bf16
  unsharded copies of the units in use: every layer from forward to backward at ``zero_stage=2``,
  the current and the prefetched layer at 3; the root unit with embeddings and head always),
  DeepSpeed ZeRO-2/3 (bf16 module or partitions, fp32 master and Adam partitions, reduce bucket),
  Megatron (bf16 weights and fp32 gradient buffer per TP×PP shard, distributed optimizer over DP);
  offloaded state moves to the host lines.
- **activations** at ``micro_batch_tokens``: with gradient checkpointing, each layer's input plus one
  layer recomputed in backward and its gradient temporaries; without, every layer's saved tensors.
- **logits / loss**: the fused LM head's chunk working set and its fp32 weight-gradient accumulator
  (the plain head's ``[T, V]`` fp32 log-softmax is shown for comparison).
- **attention workspace**: keys and values gathered per interval (``flash_attn`` / ``segment``, from
  the real interval plan of an OpenMementos-shaped batch) and their fp32 gradient buffers.
- **host**: rank 0 and the other ranks at load and at export, and offloaded state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from memento_train.planning.shapes import ModelShape

GiB = 2**30
# What torch.cuda reports as total memory, GiB.
GPUS = {"H100": 79.6, "H200": 140.4, "B200": 179.0}
RUNTIME_RESERVE = 3 * GiB  # CUDA context, NCCL buffers, allocator slack
DS_DEFAULT_BUCKET = 500_000_000  # DeepSpeed's default reduce_bucket_size (elements)
GATHERING_BACKENDS = ("flash_attn", "segment")
SEGMENT_QUERY_CHUNK = 512  # memento_train.attention.segment.QUERY_CHUNK
GPUS_PER_NODE = 8


@dataclass(frozen=True)
class Workload:
    """What one optimizer step asks of a trainer GPU."""

    tokens: int  # micro_batch_tokens
    doc_tokens: int  # the longest document (OpenMementos-shaped batches are packed from these)
    keep_last_n_blocks: int  # -1 = causal (stage 1)
    checkpointing: bool
    backend: str  # the attention backend that runs on the GPU
    head_chunk_rows: int = 2048
    with_entropy: bool = False
    reference_model: bool = False  # RL: a frozen bf16 copy sharded like the policy


@dataclass(frozen=True)
class Parallel:
    """How the model is split: the engine section plus the number of trainer GPUs."""

    kind: str
    precision: str
    zero_stage: int
    offload_optimizer: bool
    offload_params: bool
    tensor_parallel: int
    pipeline_parallel: int
    world: int
    comm_bytes: int = 2  # DeepSpeed gradient-communication element size
    bucket: int = DS_DEFAULT_BUCKET

    @property
    def data_parallel(self) -> int:
        return max(1, self.world // (self.tensor_parallel * self.pipeline_parallel))


@dataclass
class Line:
    """One figure. Lines of different ``phase`` (``"layer"``: one layer's recompute and backward;
    ``"head"``: the fused head at the turn from forward to backward) never coexist: the peak counts
    the larger phase."""

    name: str
    bytes: float
    note: str = ""
    phase: str | None = None


@dataclass
class MemoryPlan:
    """Device lines (summed into :attr:`device_total`) and host lines (per rank, not summed)."""

    device: list[Line] = field(default_factory=list)
    host: list[Line] = field(default_factory=list)
    capacity: float = 0.0

    @property
    def device_total(self) -> float:
        """The peak: lines present throughout, plus the larger of the transient phases."""
        phases: dict[str, float] = {}
        for line in self.device:
            if line.phase:
                phases[line.phase] = phases.get(line.phase, 0.0) + line.bytes
        return sum(line.bytes for line in self.device if not line.phase) + max(phases.values(), default=0.0)

    @property
    def fits(self) -> bool:
        return self.device_total <= self.capacity

    def get(self, name: str) -> float:
        return next(line.bytes for line in self.device if line.name == name)


def dtype_bytes(precision: str) -> int:
    return {"bf16": 2, "fp16": 2, "fp32": 4}[precision]


# -- attention geometry --------------------------------------------------------------------------
@dataclass(frozen=True)
class AttentionGeometry:
    """Keys gathered per layer (``gathered[w]`` for window ``w``) and ``segment`` mask elements, for an
    OpenMementos-shaped batch of ``tokens`` packed from ``doc_tokens``-long documents."""

    tokens: int
    gathered: dict[int | None, int]
    segment_mask: dict[int | None, int]


def attention_geometry(
    tokens: int, doc_tokens: int, keep_last_n_blocks: int, windows: tuple[int | None, ...]
) -> AttentionGeometry:
    """Gathered keys and segment-mask sizes from the real interval plan (see ``attention/meta.py``)."""
    from memento_train.attention.meta import MementoAttentionMeta
    from memento_train.planning.trace_shapes import memento_batch

    meta, _ = memento_batch(tokens, doc_tokens=doc_tokens, keep_last_n_blocks=max(keep_last_n_blocks, 0))
    if keep_last_n_blocks < 0:  # stage 1: the same documents, causal
        meta = MementoAttentionMeta.causal(meta.cu_seqlens)
    plan = meta.interval_plan()
    cu_q, cu_k = plan.cu_q.tolist(), plan.cu_k.tolist()
    gathered: dict[int | None, int] = {}
    masks: dict[int | None, int] = {}
    for w in set(windows) or {None}:
        g = m = 0
        for i in range(plan.num_intervals):
            n_q = cu_q[i + 1] - cu_q[i]
            older = cu_k[i + 1] - cu_k[i] - n_q
            older = min(older, w) if w else older
            g += older + n_q
            for c0 in range(0, n_q, SEGMENT_QUERY_CHUNK):
                c = min(SEGMENT_QUERY_CHUNK, n_q - c0)
                m += c * (older + c0 + c)
        gathered[w], masks[w] = g, m
    return AttentionGeometry(tokens, gathered, masks)


# -- activations -----------------------------------------------------------------------------------
def layer_activation_bytes(
    s: ModelShape, b: int, tokens: int, gathered: int, backend: str, *, tp: int = 1, segment_mask: int = 0
) -> float:
    """Bytes autograd saves for backward in one decoder layer over ``tokens`` tokens (HF layout)."""
    q, kv = s.heads * s.head_dim / tp, s.kv_heads * s.head_dim / tp
    hq, hkv, f, h = s.heads / tp, s.kv_heads / tp, s.ffn / tp, s.hidden
    t = tokens
    gather = gathered / tokens if backend in GATHERING_BACKENDS else 1.0

    def norm(n, rows=1, output_saved=True):  # RMSNorm: fp32 input copy, 1/rms, normalised (+ output)
        return 4 * n + 4 * rows + b * n * (2 if output_saved else 1)

    attn = b * q * 2 + 2 * b * kv * gather + 4 * hq  # q, out, k and v (gathered), logsumexp
    if backend == "segment":
        attn += b * q  # the concatenated output is a copy of the per-chunk outputs
    mlp = 4 * b * f  # gate, up, act(gate), act(gate)·up
    if s.family == "olmo3":  # norms after attention / MLP; q/k norms over the whole projection
        per_token = (
            b * h
            + norm(q, output_saved=False)
            + norm(kv, output_saved=False)
            + attn
            + norm(h, output_saved=False)
            + b * h
            + mlp
            + norm(h, output_saved=False)
        )
    else:
        per_token = 2 * norm(h) + attn + mlp
        if s.family == "qwen3":
            per_token += norm(q, hq, output_saved=False) + norm(kv, hkv, output_saved=False)
        elif s.family == "phi3" and backend not in GATHERING_BACKENDS:
            per_token += b * (q + kv)  # v is a view of the fused qkv output, which it keeps alive
    return per_token * t + (4 * segment_mask if backend == "segment" else 0)


def backward_temporaries(s: ModelShape, b: int, tokens: int, *, tp: int = 1) -> float:
    """Activation gradients at the peak of one layer's backward: it comes first, while all of the
    layer's saved tensors still live, holding the gradient of the layer output and of the MLP's
    down-projection input (later ones replace saved tensors that autograd has already freed)."""
    return tokens * b * (s.ffn / tp + s.hidden)


def activation_lines(
    s: ModelShape, w: Workload, b: int, geo: AttentionGeometry, *, tp: int = 1
) -> tuple[float, float, float]:
    """``(resident, layer, head)``: what stays saved through backward, what one layer adds while it is
    (re)computed and back-propagated, and the fused head's working set (forward or backward, whichever
    is larger). Under pipeline parallelism 1F1B keeps ``pp`` micro-batches in flight on the first stage,
    each over ``layers / pp`` layers: the same number of saved layers as without it."""
    t = w.tokens
    layers = [
        layer_activation_bytes(s, b, t, geo.gathered[win], w.backend, tp=tp, segment_mask=geo.segment_mask[win])
        for win in (s.windows or (None,) * s.layers)
    ]
    # token ids, RoPE cos/sin, the final norm (its output is the head's saved input), the head's per-row stats
    model_level = t * (8 + 2 * s.head_dim * b + 4 * s.hidden + 4 + 2 * b * s.hidden + 24)
    if w.checkpointing:
        resident = s.layers * t * b * s.hidden + model_level
        layer = max(layers) + backward_temporaries(s, b, t, tp=tp)
    else:
        resident = sum(layers) + model_level
        layer = backward_temporaries(s, b, t, tp=tp)
    return resident, layer, fused_head_bytes(s, w, b, tp=tp)


def fused_head_bytes(s: ModelShape, w: Workload, b: int, *, tp: int = 1) -> float:
    """Working set of :mod:`memento_train.models.lm_head` (one chunk's logits; the fp32 weight-gradient sum)."""
    v, c = s.vocab / tp, min(w.head_chunk_rows, w.tokens)
    low = b if b < 4 else 0  # the matmul's low-precision output beside its fp32 copy
    forward = c * v * (4 + 4 + low + (4 if w.with_entropy else 0))  # logits, logsumexp's exp, (p·z)
    backward = (
        c * v * (4 + low + (4 if w.with_entropy else 0))  # log p (and p for the entropy's gradient)
        + 4 * v * s.hidden
        + (b * v * s.hidden if b < 4 else 0)  # fp32 weight-grad sum, a chunk's part
        + (4 if tp > 1 else b) * w.tokens * s.hidden
    )  # the hidden-state gradient
    return max(forward, backward)


def gathered_key_grads(s: ModelShape, w: Workload, geo: AttentionGeometry, *, tp: int = 1) -> float:
    """fp32 gradient buffers of one layer's gathered keys and values (``flash_attn`` sums them in fp32)."""
    if w.backend != "flash_attn":
        return 0.0
    kv = s.kv_heads * s.head_dim / tp
    return 2 * 4 * kv * max(geo.gathered.values())


# -- parameters, gradients, optimizer ----------------------------------------------------------------
def state_lines(s: ModelShape, p: Parallel) -> tuple[list[Line], list[Line]]:
    """Device and host lines for weights, master weights, gradients and optimizer state."""
    b = dtype_bytes(p.precision)
    P = s.params
    dev, host = [], []
    if p.kind == "megatron":
        t, pp, d = p.tensor_parallel, p.pipeline_parallel, p.data_parallel
        per_stage = s.layers // pp * s.layer_params + max(s.embedding_params, s.head_params or s.embedding_params)
        if pp == 1:
            per_stage = s.params
        local = per_stage / t
        dev += [
            Line("weights", b * local, f"{p.precision}, 1/{t} TP x stage of {pp}"),
            Line("gradients", 4 * local, "fp32 gradient buffer (grad_reduce_in_fp32)"),
        ]
        masters = 4 if b != 4 else 0
        dev += [
            Line("master weights", masters * local / d, f"fp32, distributed optimizer over DP={d}"),
            Line("optimizer state", 8 * local / d, "Adam m, v fp32, sharded over DP"),
        ]
        return dev, host
    n = p.world
    shard = P / n
    if p.kind == "fsdp2":
        # (FSDP2 offloads the optimizer only together with the parameters: offload_params)
        unsharded = s.embedding_params + s.head_params + s.hidden
        unsharded += s.layers * s.layer_params if p.zero_stage == 2 else 2 * s.layer_params
        where = host if p.offload_params else dev
        dev.append(
            Line(
                "weights",
                b * unsharded,
                f"{p.precision} unsharded: root unit + "
                + ("every layer (zero_stage=2)" if p.zero_stage == 2 else "2 layers (zero_stage=3)"),
            )
        )
        where.append(Line("master weights", 4 * shard, f"fp32 shards, 1/{n}"))
        grads_unsharded = b * (s.embedding_params + s.head_params + 2 * s.layer_params)
        dev.append(
            Line(
                "gradients",
                (0 if p.offload_params else 4 * shard) + grads_unsharded,
                "fp32 shards + unsharded grads of the root unit and 2 layers in backward",
            )
        )
        where.append(Line("optimizer state", 8 * shard, "Adam m, v fp32 shards"))
        if p.offload_params:
            host.append(Line("gradients", 4 * shard, "fp32 shards (offloaded)"))
        return dev, host
    # deepspeed
    if p.zero_stage == 2:
        dev.append(Line("weights", b * P, f"{p.precision} module on every GPU (ZeRO-2)"))
    else:
        working = 2 * s.layer_params + max(s.embedding_params, s.head_params)
        (host if p.offload_params else dev).append(Line("weights", b * shard, f"{p.precision} partitions, 1/{n}"))
        dev.append(Line("weights (gathered)", b * working, "layers in use + embedding / head (ZeRO-3)"))
    opt_where = host if p.offload_optimizer else dev
    if b != 4:
        opt_where.append(Line("master weights", 4 * shard, f"fp32 partitions, 1/{n}"))
    opt_where.append(Line("optimizer state", 8 * shard, "Adam m, v fp32 partitions"))
    dev.append(
        Line(
            "gradients",
            (0 if p.offload_optimizer else 4 * shard) + p.comm_bytes * p.bucket,
            "fp32 partitions + reduce bucket",
        )
    )
    if p.offload_optimizer:
        host.append(Line("gradients", 4 * shard, "fp32 partitions (offloaded)"))
    return dev, host


def plan_memory(
    s: ModelShape,
    p: Parallel,
    w: Workload,
    *,
    capacity: float,
    reserve: float = RUNTIME_RESERVE,
    geo: AttentionGeometry | None = None,
) -> MemoryPlan:
    """The per-GPU plan of one trainer rank (the largest one: pipeline stage 0 under Megatron)."""
    b = dtype_bytes(p.precision)
    tp = p.tensor_parallel if p.kind == "megatron" else 1
    pp = p.pipeline_parallel if p.kind == "megatron" else 1
    geo = geo or attention_geometry(w.tokens, w.doc_tokens, w.keep_last_n_blocks, s.windows or (None,))
    plan = MemoryPlan(capacity=capacity)
    dev, host = state_lines(s, p)
    plan.device += dev
    if w.reference_model:
        plan.device.append(
            Line(
                "reference model",
                2 * s.params / (p.world if p.kind != "megatron" else tp * pp),
                "bf16, sharded like the policy",
            )
        )
    resident, layer, head = activation_lines(s, w, b, geo, tp=tp)
    plain = w.tokens * s.vocab / tp * (4 + b)
    plan.device += [
        Line(
            "activations",
            resident,
            ("checkpointed layer inputs" if w.checkpointing else "every layer's saved tensors")
            + f" at {w.tokens} tokens",
        ),
        Line(
            "layer backward",
            layer,
            ("one layer recomputed + " if w.checkpointing else "") + "gradient temporaries",
            phase="layer",
        ),
        Line(
            "attention workspace",
            gathered_key_grads(s, w, geo, tp=tp),
            f"{w.backend}: fp32 grads of {max(geo.gathered.values())} gathered keys/layer",
            phase="layer",
        ),
        Line(
            "logits / loss",
            head,
            f"fused head, {min(w.head_chunk_rows, w.tokens)}-row chunks (a plain head keeps {plain / GiB:.1f} GiB)",
            phase="head",
        ),
    ]
    if reserve:
        plan.device.append(Line("runtime reserve", reserve, "CUDA context, NCCL, allocator slack"))
    plan.host += host_lines(s)
    plan.host += host
    return plan


def host_lines(s: ModelShape) -> list[Line]:
    """Host memory per rank at load (rank 0 reads the checkpoint once) and at export (rank 0 gathers)."""
    ckpt = 2 * s.params  # released models and bf16 exports are bf16
    flight = 4 * s.largest_tensor
    return [
        Line("host at load, rank 0", ckpt + flight, "the checkpoint in its dtype + one tensor in flight"),
        Line("host at load, other ranks", 2 * flight, "meta model; one tensor received at a time"),
        Line("host at export, rank 0", 4 * s.params + flight, "gathered fp32 weights, converted in place"),
        Line("host at export, other ranks", flight, "one gathered tensor at a time"),
    ]


# -- advice ----------------------------------------------------------------------------------------------
def suggestions(
    s: ModelShape, p: Parallel, w: Workload, *, capacity: float, min_tokens: int, reserve: float = RUNTIME_RESERVE
) -> list[tuple[str, MemoryPlan]]:
    """Single changes that make the plan fit, each with its plan, cheapest first."""
    tries: list[tuple[str, Parallel, Workload]] = []
    if not w.checkpointing:
        tries.append(("model.gradient_checkpointing=true", p, replace(w, checkpointing=True)))
    if p.kind == "fsdp2" and p.zero_stage == 2:
        tries.append(("engine.zero_stage=3", replace(p, zero_stage=3), w))
    if p.kind == "deepspeed" and p.zero_stage == 2:
        tries.append(("engine.zero_stage=3", replace(p, zero_stage=3), w))
    half = max(min_tokens, w.tokens // 2)
    if half < w.tokens:
        tries.append((f"train.micro_batch_tokens={half}", p, replace(w, tokens=half)))
    if p.kind == "deepspeed" and not p.offload_optimizer:
        tries.append(("engine.offload_optimizer=true", replace(p, offload_optimizer=True), w))
    if p.kind == "fsdp2" and not p.offload_params:
        tries.append(
            (
                "engine.zero_stage=3 engine.offload_params=true",
                replace(p, zero_stage=3, offload_params=True, offload_optimizer=True),
                w,
            )
        )
    tries.append((f"cluster.num_workers={2 * p.world}", replace(p, world=2 * p.world), w))
    out = []
    for change, p2, w2 in tries:
        plan = plan_memory(s, p2, w2, capacity=capacity, reserve=reserve)
        if plan.fits:
            out.append((change, plan))
    return out


def gpu_capacity(name: str) -> float:
    """Bytes of a GPU named in :data:`GPUS` (case-insensitive)."""
    key = name.upper()
    if key not in GPUS:
        from memento_train.config.errors import ConfigError

        raise ConfigError(f"gpu={name!r} is not known; choose one of {', '.join(GPUS)}")
    return GPUS[key] * GiB


def kv_cache_tokens(s: ModelShape, free_bytes: float) -> int:
    """Tokens of bf16 KV cache that fit in ``free_bytes`` (vLLM rollout workers)."""
    per_token = 2 * s.layers * s.kv_heads * s.head_dim * 2
    return max(0, math.floor(free_bytes / per_token))
