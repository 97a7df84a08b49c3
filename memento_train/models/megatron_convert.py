"""Weights between Hugging Face and Megatron-core layouts, sharded by tensor-parallel rank.

A *Megatron shard* here is the state of one TP rank for the **whole** model, keyed by Megatron
parameter names with **global** layer numbers (``decoder.layers.<global>.…``). Pipeline stages take
their slice with :func:`stage_view` (global → local layer numbers), so this module knows nothing
about pipeline parallelism.

Layouts (``G`` KV groups, ``q = Hq / G`` query heads per group, ``D`` head dim, ``F`` FFN size):

- ``linear_qkv.weight`` is grouped: for each KV group, its ``q`` query heads, then its key head, then
  its value head (``D`` rows each). TP rank ``r`` holds groups ``[r·G/TP, (r+1)·G/TP)``: a contiguous
  row chunk of the fused matrix. HF keeps ``q_proj``/``k_proj``/``v_proj`` (Qwen3, Llama) or one
  ``qkv_proj`` ``[all q; all k; all v]`` (Phi-3).
- ``linear_fc1.weight`` is ``[gate_r; up_r]`` *per rank* (Megatron's SwiGLU chunks the local output
  in two), so the unsharded fused matrix interleaves rank chunks; HF has ``gate_proj``/``up_proj`` or
  Phi-3's ``gate_up_proj = [gate; up]``.
- Row-parallel ``linear_proj`` / ``linear_fc2`` split columns; the vocabulary-parallel embedding and
  output layer split rows of the vocabulary padded to
  :func:`~memento_train.models.megatron_gpt.padded_vocab_size` (pad rows are zero and dropped again,
  so the memento special-token rows at the end of the real vocabulary round-trip exactly).
- Norms (and q/k norms) are replicated on every TP rank.

Conversion is pure slicing and concatenation, so HF → Megatron → HF is bit-identical.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch

from memento_train.models.megatron_gpt import HFArchitecture, MementoGPTModel, padded_vocab_size

Tensor = torch.Tensor


def _hf_layer(arch: HFArchitecture, i: int) -> dict[str, str]:
    p = f"model.layers.{i}."
    names = {
        "input_layernorm": p + "input_layernorm.weight",
        "post_attention_layernorm": p + "post_attention_layernorm.weight",
        "o": p + "self_attn.o_proj.weight",
        "down": p + "mlp.down_proj.weight",
    }
    if arch.family == "phi3":
        names.update(qkv=p + "self_attn.qkv_proj.weight", gate_up=p + "mlp.gate_up_proj.weight")
    else:
        names.update(
            q=p + "self_attn.q_proj.weight",
            k=p + "self_attn.k_proj.weight",
            v=p + "self_attn.v_proj.weight",
            gate=p + "mlp.gate_proj.weight",
            up=p + "mlp.up_proj.weight",
        )
    if arch.qk_layernorm:
        names.update(q_norm=p + "self_attn.q_norm.weight", k_norm=p + "self_attn.k_norm.weight")
    return names


def _mg_layer(i: int) -> dict[str, str]:
    p = f"decoder.layers.{i}."
    return {
        "input_layernorm": p + "input_layernorm.weight",
        "pre_mlp_layernorm": p + "pre_mlp_layernorm.weight",
        "qkv": p + "self_attention.linear_qkv.weight",
        "q_norm": p + "self_attention.q_layernorm.weight",
        "k_norm": p + "self_attention.k_layernorm.weight",
        "proj": p + "self_attention.linear_proj.weight",
        "fc1": p + "mlp.linear_fc1.weight",
        "fc2": p + "mlp.linear_fc2.weight",
    }


def hf_parameter_names(arch: HFArchitecture) -> list[str]:
    """Every key of the HF model's ``state_dict()`` (the tied ``lm_head.weight`` alias included)."""
    names = ["model.embed_tokens.weight"]
    for i in range(arch.num_layers):
        names += list(_hf_layer(arch, i).values())
    return names + ["model.norm.weight", "lm_head.weight"]


# -- HF → Megatron ------------------------------------------------------------------------------
def _pad_rows(w: Tensor, rows: int) -> Tensor:
    if w.shape[0] == rows:
        return w
    return torch.cat([w, w.new_zeros(rows - w.shape[0], *w.shape[1:])], 0)


def _fuse_qkv(arch: HFArchitecture, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """``[G · (q+2) · D, H]``: per KV group, its query heads, its key head, its value head."""
    g, d = arch.num_kv_heads, arch.head_dim
    rest = q.shape[1:]
    return torch.cat([q.reshape(g, -1, *rest), k.reshape(g, d, *rest), v.reshape(g, d, *rest)], 1).reshape(-1, *rest)


def _split_qkv(arch: HFArchitecture, fused: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    g, d = arch.num_kv_heads, arch.head_dim
    qpg = arch.num_heads // g
    rest = fused.shape[1:]
    q, k, v = fused.reshape(g, (qpg + 2) * d, *rest).split([qpg * d, d, d], 1)
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)


def hf_to_megatron(
    hf: Mapping[str, Tensor], arch: HFArchitecture, *, tp_rank: int = 0, tp_size: int = 1, vocab_size: int | None = None
) -> dict[str, Tensor]:
    """The Megatron state of TP rank ``tp_rank`` (global layer numbers) from an HF state dict.

    ``vocab_size`` is the padded vocabulary of the Megatron model (default: :func:`padded_vocab_size`).
    Tied models get no ``output_layer.weight`` (the embedding serves both ends).
    """
    return dict(iter_hf_to_megatron(hf, arch, tp_rank=tp_rank, tp_size=tp_size, vocab_size=vocab_size))


def iter_hf_to_megatron(
    hf: Mapping[str, Tensor], arch: HFArchitecture, *, tp_rank: int = 0, tp_size: int = 1, vocab_size: int | None = None
) -> Iterator[tuple[str, Tensor]]:
    """:func:`hf_to_megatron` one Megatron tensor at a time, reading ``hf`` in a fixed order (the same
    on every rank: ``hf`` may fetch each tensor from another rank) and keeping nothing between items."""
    vocab = vocab_size or padded_vocab_size(arch.vocab_size, tp_size)

    # Copies, not views: a slice must not keep the whole HF tensor alive (a rank holds only its shard).
    def rows(t: Tensor) -> Tensor:
        return t.chunk(tp_size, 0)[tp_rank].clone(memory_format=torch.contiguous_format)

    def cols(t: Tensor) -> Tensor:
        return t.chunk(tp_size, 1)[tp_rank].clone(memory_format=torch.contiguous_format)

    yield "embedding.word_embeddings.weight", rows(_pad_rows(hf["model.embed_tokens.weight"], vocab))
    q_rows, kv_rows = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
    for i in range(arch.num_layers):
        h, m = _hf_layer(arch, i), _mg_layer(i)
        if arch.family == "phi3":
            q, k, v = hf[h["qkv"]].split([q_rows, kv_rows, kv_rows], 0)
        else:
            q, k, v = hf[h["q"]], hf[h["k"]], hf[h["v"]]
        yield m["qkv"], rows(_fuse_qkv(arch, q, k, v))
        del q, k, v
        if arch.family == "phi3":
            gate, up = hf[h["gate_up"]].chunk(2, 0)
        else:
            gate, up = hf[h["gate"]], hf[h["up"]]
        yield m["fc1"], torch.cat([rows(gate), rows(up)], 0)
        del gate, up
        yield m["input_layernorm"], hf[h["input_layernorm"]].contiguous()
        yield m["pre_mlp_layernorm"], hf[h["post_attention_layernorm"]].contiguous()
        yield m["proj"], cols(hf[h["o"]])
        yield m["fc2"], cols(hf[h["down"]])
        if arch.qk_layernorm:
            yield m["q_norm"], hf[h["q_norm"]].contiguous()
            yield m["k_norm"], hf[h["k_norm"]].contiguous()
    yield "decoder.final_layernorm.weight", hf["model.norm.weight"].contiguous()
    if not arch.tied_embeddings:
        yield "output_layer.weight", rows(_pad_rows(hf["lm_head.weight"], vocab))


# -- Megatron → HF ------------------------------------------------------------------------------
def megatron_to_hf(shards: Sequence[Mapping[str, Tensor]], arch: HFArchitecture) -> dict[str, Tensor]:
    """The HF state dict (keys of ``model.state_dict()``) from the TP shards, in TP-rank order.

    Tied models get ``lm_head.weight`` as the same tensor as ``model.embed_tokens.weight`` (as HF's
    own ``state_dict()`` does); :func:`memento_train.export.writer.export_hf` ties it again when it writes.
    """

    def cat_rows(name: str) -> Tensor:
        return torch.cat([s[name] for s in shards], 0)

    def cat_cols(name: str) -> Tensor:
        return torch.cat([s[name] for s in shards], 1)

    out = {"model.embed_tokens.weight": cat_rows("embedding.word_embeddings.weight")[: arch.vocab_size]}
    for i in range(arch.num_layers):
        h, m = _hf_layer(arch, i), _mg_layer(i)
        q, k, v = _split_qkv(arch, cat_rows(m["qkv"]))
        gates, ups = zip(*(s[m["fc1"]].chunk(2, 0) for s in shards))
        gate, up = torch.cat(gates, 0), torch.cat(ups, 0)
        if arch.family == "phi3":
            out[h["qkv"]] = torch.cat([q, k, v], 0)
            out[h["gate_up"]] = torch.cat([gate, up], 0)
        else:
            out[h["q"]], out[h["k"]], out[h["v"]] = q, k, v
            out[h["gate"]], out[h["up"]] = gate, up
        out[h["o"]] = cat_cols(m["proj"])
        out[h["down"]] = cat_cols(m["fc2"])
        out[h["input_layernorm"]] = shards[0][m["input_layernorm"]]
        out[h["post_attention_layernorm"]] = shards[0][m["pre_mlp_layernorm"]]
        if arch.qk_layernorm:
            out[h["q_norm"]] = shards[0][m["q_norm"]]
            out[h["k_norm"]] = shards[0][m["k_norm"]]
    out["model.norm.weight"] = shards[0]["decoder.final_layernorm.weight"]
    if arch.tied_embeddings:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    else:
        out["lm_head.weight"] = cat_rows("output_layer.weight")[: arch.vocab_size]
    return {k: v.contiguous() for k, v in out.items()}


# -- pipeline stages: global ↔ local layer numbers ----------------------------------------------
def stage_view(
    shard: Mapping[str, Tensor],
    *,
    layer_offset: int,
    num_layers: int,
    pre_process: bool,
    post_process: bool,
    tied: bool,
) -> dict[str, Tensor]:
    """The part of a (global-numbered) shard that one pipeline stage holds, with local layer numbers.

    A tied model's last stage (when it is not also the first) keeps its own copy of the embedding as
    ``output_layer.weight``, as Megatron does.
    """
    out = {}
    for name, t in shard.items():
        if name.startswith("decoder.layers."):
            i = int(name.split(".")[2])
            if layer_offset <= i < layer_offset + num_layers:
                out[name.replace(f"decoder.layers.{i}.", f"decoder.layers.{i - layer_offset}.", 1)] = t
        elif name == "embedding.word_embeddings.weight":
            if pre_process:
                out[name] = t
            if post_process and tied and not pre_process:
                out["output_layer.weight"] = t
        elif name == "decoder.final_layernorm.weight" or name == "output_layer.weight":
            if post_process:
                out[name] = t
    return out


def global_view(local: Mapping[str, Tensor], *, layer_offset: int, pre_process: bool, tied: bool) -> dict[str, Tensor]:
    """Inverse of :func:`stage_view` for one stage (global layer numbers; a tied copy dropped)."""
    out = {}
    for name, t in local.items():
        if name.startswith("decoder.layers."):
            i = int(name.split(".")[2])
            out[name.replace(f"decoder.layers.{i}.", f"decoder.layers.{i + layer_offset}.", 1)] = t
        elif name == "output_layer.weight" and tied and not pre_process:
            continue  # the last stage's copy of the shared embedding
        else:
            out[name] = t
    return out


# -- into a live model ----------------------------------------------------------------------------
def load_hf_weights(gpt: MementoGPTModel, hf: Mapping[str, Tensor], arch: HFArchitecture, *, tp_rank: int) -> None:
    """Copy an HF state dict into this rank's pipeline stage of ``gpt``, converted for TP rank ``tp_rank``.

    ``hf`` is read one tensor at a time in :func:`iter_hf_to_megatron`'s order (it may fetch each one
    from another rank); each converted tensor goes straight into the stage's parameters or is dropped,
    so a rank holds its slice plus one tensor in flight. Any name the model lacks or leaves unloaded
    raises: a conversion mismatch must never train from initial weights.
    """
    target = gpt.state_dict(keep_vars=True)
    loaded = set()
    with torch.no_grad():
        for name, value in iter_hf_to_megatron(
            hf, arch, tp_rank=tp_rank, tp_size=gpt.config.tensor_model_parallel_size, vocab_size=gpt.vocab_size
        ):
            local = stage_view(
                {name: value},
                layer_offset=gpt.layer_offset,
                num_layers=len(gpt.decoder.layers),
                pre_process=gpt.pre_process,
                post_process=gpt.post_process,
                tied=arch.tied_embeddings,
            )
            for key, v in local.items():
                if key not in target:
                    raise RuntimeError(f"HF → Megatron conversion mismatch: unexpected {key}")
                target[key].copy_(v)
                loaded.add(key)
    missing = [k for k in target if k not in loaded and not k.endswith("_extra_state")]
    if missing:
        raise RuntimeError(f"HF → Megatron conversion mismatch: missing {missing[:5]}")
