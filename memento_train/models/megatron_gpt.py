"""Megatron-core ``GPTModel`` built from a Hugging Face config, with memento attention as core attention.

Four pieces, all small:

- :func:`describe_hf_config` reads the HF config of a Qwen3, Llama-family or Phi-3/Phi-4 model into an
  :class:`HFArchitecture` (the shapes conversion and the Megatron config need) and refuses what the
  Megatron path cannot reproduce exactly (sliding windows, runtime-dynamic RoPE, odd bias layouts),
  naming the option.
- :class:`MementoCoreAttention` replaces the layer spec's ``core_attention``. Megatron hands it packed
  THD tensors ``[T, heads/TP, D]`` (after RoPE and q/k norms); it calls
  :func:`~memento_train.attention.memento_attention` with the batch's ``cu_seqlens`` and ``kill_row``,
  which travel on :class:`MementoPackedSeqParams` (Megatron's packed-sequence parameters plus the
  memento metadata), so nothing is global state and activation recompute replays the same mask.
- :class:`MementoGPTModel` is ``GPTModel`` whose rotary embedding follows the batch's ``position_ids``
  (logical positions, docs/architecture.md §2) with the HF model's own inverse frequencies, instead of Megatron's
  "0..len-1 per packed sequence", so RoPE is bit-for-bit what the HF model computes.
- :func:`build_gpt_model` builds one pipeline stage of it for an HF config (:func:`architecture_of` and
  :func:`attention_backend_of` read what a loaded HF model adds to its config); the weights come in
  through :func:`~memento_train.models.megatron_convert.load_hf_weights`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig

from memento_train.attention import MementoAttentionMeta, memento_attention
from memento_train.config.errors import ConfigError

FAMILIES = ("qwen3", "llama", "phi3")
# HF rope types whose inverse frequencies are fixed at construction (no sequence-length dependence).
STATIC_ROPE_TYPES = ("default", "linear", "llama3")
VOCAB_PAD_MULTIPLE = 128


@dataclass(frozen=True)
class HFArchitecture:
    """The shapes of a decoder-only HF model that the Megatron model and the weight conversion need."""

    family: str  # "qwen3" | "llama" | "phi3": which HF parameter naming to use
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int  # rows of the HF embedding (memento tokens included)
    tied_embeddings: bool
    qk_layernorm: bool
    norm_eps: float
    max_position_embeddings: int


def _rope_parameters(hf_config) -> dict:
    params = getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {}
    return dict(params)


def describe_hf_config(hf_config) -> HFArchitecture:
    """Read ``hf_config`` into an :class:`HFArchitecture`; :class:`ConfigError` for what is unsupported."""
    family = getattr(hf_config, "model_type", None)
    if family not in FAMILIES:
        raise ConfigError(
            f"engine.kind=megatron supports HF model types {FAMILIES}, got model_type={family!r}; "
            "use engine.kind=fsdp2 or engine.kind=deepspeed for other architectures"
        )
    act = getattr(hf_config, "hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"model hidden_act={act!r}: the megatron engine implements SwiGLU (silu) MLPs only")
    if getattr(hf_config, "use_sliding_window", False) or (
        family != "qwen3" and getattr(hf_config, "sliding_window", None)
    ):
        raise ConfigError(
            f"model {family} uses sliding-window attention (sliding_window="
            f"{getattr(hf_config, 'sliding_window', None)}); the megatron engine runs full memento attention "
            "only: use engine.kind=fsdp2 or a config without sliding_window"
        )
    rope = _rope_parameters(hf_config)
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in STATIC_ROPE_TYPES:
        raise ConfigError(
            f"model rope_parameters.rope_type={rope_type!r} changes RoPE with the sequence length; the megatron "
            f"engine supports {STATIC_ROPE_TYPES}: use engine.kind=fsdp2 for this model"
        )
    attention_bias = bool(getattr(hf_config, "attention_bias", False))
    if attention_bias:
        # HF attention_bias puts a bias on q/k/v *and* o_proj; Megatron ties o_proj's bias to the MLP's
        # (add_bias_linear), so only the all-or-nothing layout converts exactly.
        raise ConfigError(
            "model attention_bias=true is not supported by the megatron engine (o_proj bias "
            "has no Megatron counterpart without MLP biases); use engine.kind=fsdp2"
        )
    if getattr(hf_config, "mlp_bias", False):
        raise ConfigError("model mlp_bias=true is not supported by the megatron engine; use engine.kind=fsdp2")
    heads = hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
    return HFArchitecture(
        family=family,
        num_layers=hf_config.num_hidden_layers,
        hidden_size=hf_config.hidden_size,
        ffn_hidden_size=hf_config.intermediate_size,
        num_heads=heads,
        num_kv_heads=getattr(hf_config, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        vocab_size=hf_config.vocab_size,
        tied_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
        qk_layernorm=family == "qwen3",
        norm_eps=hf_config.rms_norm_eps,
        max_position_embeddings=hf_config.max_position_embeddings,
    )


def architecture_of(hf_model) -> HFArchitecture:
    """:func:`describe_hf_config` of a loaded HF model, with the vocabulary its embedding really has (the
    embedding's rows are the truth: memento tokens may have grown it past ``config.vocab_size``)."""
    rows = hf_model.get_input_embeddings().weight.shape[0]
    return dataclasses.replace(describe_hf_config(hf_model.config), vocab_size=rows)


def attention_backend_of(hf_model) -> str:
    """The memento-attention backend the loop chose for the HF model (``memento_<backend>``), else ``auto``."""
    from memento_train.attention.hf import PREFIX

    impl = getattr(hf_model.config, "_attn_implementation", None) or ""
    return impl[len(PREFIX) :] if impl.startswith(PREFIX) else "auto"


def padded_vocab_size(vocab_size: int, tensor_parallel: int, multiple: int = VOCAB_PAD_MULTIPLE) -> int:
    """Rows of Megatron's (vocab-parallel) embedding: ``vocab_size`` rounded up to ``lcm(multiple, TP)``.

    The pad depends on TP only when TP does not divide ``multiple`` (never for powers of two up to
    128), so Megatron checkpoints keep one global shape across TP sizes. Padded rows are zero and are
    cut off the logits and the exported weights.
    """
    step = math.lcm(multiple, tensor_parallel)
    return -(-vocab_size // step) * step


def hf_inv_freq(hf_config) -> torch.Tensor:
    """RoPE inverse frequencies exactly as the HF model computes them (fp32, ``[rotary_dim / 2]``)."""
    rope = _rope_parameters(hf_config)
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "default":
        arch = describe_hf_config(hf_config)
        base = rope.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
        partial = rope.get("partial_rotary_factor", getattr(hf_config, "partial_rotary_factor", 1.0)) or 1.0
        dim = int(arch.head_dim * partial)
        # Same expression as transformers' compute_default_rope_parameters (int64 arange, then float).
        return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim))
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    inv_freq, attention_scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config, "cpu")
    if attention_scaling != 1.0:
        raise ConfigError(
            f"model rope_parameters (rope_type={rope_type!r}) scale attention by {attention_scaling}; "
            "the megatron engine supports unscaled RoPE only"
        )
    return inv_freq.to(torch.float32)


def transformer_config_from_hf(
    hf_config,
    *,
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    precision: str = "fp32",
    recompute: bool = False,
    use_cpu_initialization: bool = True,
) -> TransformerConfig:
    """The Megatron :class:`TransformerConfig` of an HF Qwen3 / Llama / Phi-3 config.

    ``precision`` is the compute dtype (``bf16`` keeps fp32 master weights in the optimizer);
    ``recompute`` turns on full activation recompute of every layer (memory for ~33 % more compute).
    """
    arch = describe_hf_config(hf_config)
    if arch.num_kv_heads % tensor_parallel:
        raise ConfigError(
            f"engine.tensor_parallel={tensor_parallel} must divide the model's num_key_value_heads "
            f"({arch.num_kv_heads}); pick a divisor of it"
        )
    if arch.num_layers % pipeline_parallel:
        raise ConfigError(
            f"engine.pipeline_parallel={pipeline_parallel} must divide the model's num_hidden_layers "
            f"({arch.num_layers})"
        )
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
    return TransformerConfig(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_heads,
        num_query_groups=arch.num_kv_heads,
        kv_channels=arch.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=arch.norm_eps,
        qk_layernorm=arch.qk_layernorm,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=tensor_parallel,
        pipeline_model_parallel_size=pipeline_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        # The loop already divides by the global token count: gradients are summed over DP ranks.
        calculate_per_token_loss=True,
        use_cpu_initialization=use_cpu_initialization,
        # Every weight is overwritten by the HF conversion, but Megatron's init functions are also what
        # tag tensor-parallel parameters (`tensor_model_parallel`), which gradient-norm code relies on.
        perform_initialization=True,
        # Fused kernels need Apex/TE/CUDA; the unfused paths are exact and run anywhere.
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        recompute_granularity="full" if recompute else None,
        recompute_method="uniform" if recompute else None,
        recompute_num_layers=1 if recompute else None,
    )


# -- core attention -------------------------------------------------------------------------------
@dataclass
class MementoPackedSeqParams(PackedSeqParams):
    """Megatron's THD packed-sequence parameters plus the memento metadata of the batch."""

    memento_meta: MementoAttentionMeta | None = None

    @classmethod
    def from_meta(cls, meta: MementoAttentionMeta) -> MementoPackedSeqParams:
        cu = meta.cu_seqlens.to(torch.int32)
        return cls(
            qkv_format="thd",
            cu_seqlens_q=cu,
            cu_seqlens_kv=cu,
            max_seqlen_q=meta.max_seqlen,
            max_seqlen_kv=meta.max_seqlen,
            memento_meta=meta,
        )


class MementoCoreAttention(MegatronModule):
    """Core attention of a Megatron layer: packed memento attention over this rank's heads.

    Constructed by Megatron's ``SelfAttention`` with the standard core-attention arguments; only
    ``config`` and ``softmax_scale`` matter (no dropout, no window: sliding-window models are refused).
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
        *,
        backend: str = "auto",
    ) -> None:
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ConfigError(
                "memento core attention does not support context parallelism (docs/architecture.md §4: use "
                "head parallelism); set context_parallel_size=1"
            )
        self.backend = backend
        self.softmax_scale = softmax_scale if softmax_scale is not None else config.kv_channels**-0.5

    def forward(
        self, query, key, value, attention_mask=None, attn_mask_type=None, attention_bias=None, packed_seq_params=None
    ):
        """``query [T, Hq/TP, D]``, ``key/value [T, Hkv/TP, D]`` (THD) → ``[T, Hq/TP, D]``."""
        meta = getattr(packed_seq_params, "memento_meta", None)
        if meta is None or packed_seq_params.qkv_format != "thd":
            raise ValueError(
                "memento core attention needs packed THD inputs: pass "
                "packed_seq_params=MementoPackedSeqParams.from_meta(meta) to the model"
            )
        if attention_bias is not None:
            raise ValueError("memento core attention takes no attention bias")
        return memento_attention(query, key, value, meta, scale=self.softmax_scale, backend=self.backend)


def memento_layer_spec(qk_layernorm: bool, backend: str = "auto") -> ModuleSpec:
    """Megatron's local (no TransformerEngine) GPT layer spec with :class:`MementoCoreAttention`."""
    spec = get_gpt_layer_local_spec(qk_layernorm=qk_layernorm, normalization="RMSNorm")
    spec.submodules.self_attention.submodules.core_attention = ModuleSpec(
        module=MementoCoreAttention, params={"backend": backend}
    )
    return spec


# -- the model ------------------------------------------------------------------------------------
class MementoGPTModel(GPTModel):
    """``GPTModel`` whose RoPE angles are ``position_ids × inv_freq`` with the HF model's frequencies.

    Built with ``position_embedding_type='none'`` (no Megatron rotary module, which also keeps its
    CUDA-only frequency cache out of the way); ``_preprocess`` (GPTModel's internal hook, megatron-core
    0.16) then hands every layer per-token angles ``[T, 1, 1, rotary_dim]``, which Megatron's THD RoPE
    applies token by token (its "freqs cover every packed position" mode).
    """

    def __init__(self, *args, inv_freq: torch.Tensor, **kwargs) -> None:
        super().__init__(*args, position_embedding_type="none", **kwargs)
        # A plain attribute, not a buffer: derived from the HF config (never checkpointed) and never
        # cast by model.to(bf16), which would round the frequencies.
        self._inv_freq = {torch.device("cpu"): inv_freq.to(torch.float32).cpu()}

    @property
    def layer_offset(self) -> int:
        """Global index of this pipeline stage's first layer (0 on the first stage)."""
        layers = self.decoder.layers
        return (layers[0].layer_number - 1) if len(layers) else 0

    def rope_angles(self, position_ids: torch.Tensor) -> torch.Tensor:
        """Per-token RoPE angles ``[T, 1, 1, rotary_dim]`` in fp32 (non-interleaved halves, as HF)."""
        dev = position_ids.device
        inv = self._inv_freq.get(dev)
        if inv is None:
            inv = self._inv_freq[dev] = self._inv_freq[torch.device("cpu")].to(dev)
        freqs = position_ids.reshape(-1, 1).to(torch.float32) * inv[None, :]
        return torch.cat((freqs, freqs), dim=-1)[:, None, None, :]

    def _preprocess(self, input_ids, position_ids, *args, **kwargs):
        out = super()._preprocess(input_ids, position_ids, *args, **kwargs)
        return (out[0], self.rope_angles(position_ids), *out[2:])


def build_gpt_model(
    hf_config,
    config: TransformerConfig,
    *,
    vocab_size: int | None = None,
    pre_process: bool = True,
    post_process: bool = True,
    backend: str = "auto",
) -> MementoGPTModel:
    """A :class:`MementoGPTModel` for ``hf_config`` (parallel state must be initialised).

    ``vocab_size`` is the padded vocabulary (default :func:`padded_vocab_size` of the HF one).
    """
    arch = describe_hf_config(hf_config)
    vocab = vocab_size or padded_vocab_size(arch.vocab_size, config.tensor_model_parallel_size)
    return MementoGPTModel(
        config=config,
        transformer_layer_spec=memento_layer_spec(arch.qk_layernorm, backend),
        vocab_size=vocab,
        max_sequence_length=arch.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=arch.tied_embeddings,
        inv_freq=hf_inv_freq(hf_config),
    )
