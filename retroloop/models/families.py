"""What the looped model takes from its source family, and what it refuses (DESIGN.md §5).

The decoder layer, final norm and rotary embedding are the source's own classes, looked up from
its config (`source_family`: transformers' base model for that config class, built on the meta
device, and the classes of its modules), never from an allow-list. What a family keeps outside
its decoder layers is carried over by explicit hooks that `retroloop.models.recurrent` applies:

- embedding scale (`ScaledEmbedding`; Gemma-2/3 multiply by √h inside their embedding);
- final-logit soft-capping (`final_logit_softcap`, `softcap_logits`; Gemma-2/3);
- a rotary embedding per layer type (`SourceFamily.rope_per_layer_type`; Gemma-3 local/global);
- attention masks per layer type (`layer_attention_types`: the sliding-window layers of Mistral,
  Phi-3, Gemma-2/3 and Qwen2/3 `layer_types`);
- the attention kernels the family has (`SourceFamily.attn_implementations`; Gemma-2's
  soft-capped attention runs eager only).

What cannot be honoured (a MoE block, an attention type other than full or sliding window, a
decoder without `layers`/`norm`/`rotary_emb`, a multiplier outside the layers) is a one-line
`ModelError` naming the model type, what is missing and the tested families.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.models.auto.modeling_auto import MODEL_MAPPING

from retroloop.errors import ModelError

# The families the test suite converts (tests/unit/test_families.py); others that pass
# `source_family`'s checks convert too, and convert's equivalence tolerance catches what they miss.
TESTED_FAMILIES = (
    "llama", "qwen2", "qwen3", "olmo2", "mistral", "gemma2", "gemma3_text", "phi3", "smollm3",
)  # fmt: skip
LAYER_TYPES = ("full_attention", "sliding_attention")
# Config keys of families that scale activations outside their decoder layers in ways the looped
# model does not reproduce (Granite's embedding/logit multipliers, Cohere's logit scale, MiniCPM).
_UNSUPPORTED_MULTIPLIERS = ("embedding_multiplier", "logits_scaling", "logit_scale", "scale_emb")


def unsupported(model_type: str, missing: str) -> ModelError:
    return ModelError(
        f"model_type {model_type!r} cannot be looped: {missing}; tested families: "
        f"{', '.join(TESTED_FAMILIES)}"
    )


@dataclass(frozen=True)
class SourceFamily:
    """The source's own classes the looped model is built from, and what they need around them."""

    model_type: str
    layer_cls: type  # the decoder layer, built as layer_cls(config, source_layer_index)
    norm_cls: type  # the final norm, built as norm_cls(hidden, eps=config.rms_norm_eps)
    rope_cls: type  # the rotary embedding, built as rope_cls(config=config)
    rope_per_layer_type: bool  # forward(x, position_ids, layer_type) (Gemma-3: local/global rope)
    attn_implementations: frozenset[str]  # the attention kernels the source family supports


_FAMILIES: dict[str, SourceFamily] = {}


def source_family(config: PretrainedConfig) -> SourceFamily:
    """Look up a source's classes from its config: transformers' base model for that config class,
    built on the meta device (no memory, no weights), and the classes of its modules.

    A `ModelError` naming the model type and what is missing when the looped model cannot
    reproduce it: no decoder model in transformers, no `layers`/`norm`/`rotary_emb`, an
    embedding that does more than scale, a MoE block, an attention type other than full or
    sliding window, an activation multiplier outside the layers."""
    model_type = getattr(config, "model_type", "?")
    # What the config switches on is checked on every call; the classes are looked up once.
    for key in _UNSUPPORTED_MULTIPLIERS:
        if getattr(config, key, None) not in (None, 1, 1.0):
            raise unsupported(model_type, f"its config's {key!r} scales outside the decoder layers")
    if getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None):
        raise unsupported(model_type, "a mixture-of-experts block (router and experts)")
    if getattr(config, "use_bidirectional_attention", False):  # Gemma-3 encoder-style masks
        raise unsupported(model_type, "bidirectional attention (use_bidirectional_attention)")
    text = getattr(config, "text_config", None)
    if text is not None and text is not config:  # Gemma-3 4B+, Llama-4, ...: text + vision
        raise unsupported(
            model_type,
            f"a multimodal model; convert its text decoder (model_type "
            f"{getattr(text, 'model_type', '?')!r}, e.g. saved from its language model alone)",
        )
    if getattr(config, "num_hidden_layers", None) is None:
        raise unsupported(model_type, "no num_hidden_layers (not a decoder config)")
    bad = sorted(set(layer_attention_types(config)) - set(LAYER_TYPES))
    if bad:
        raise unsupported(
            model_type, f"attention type {bad[0]!r} (supported: {', '.join(LAYER_TYPES)})"
        )
    if getattr(config, "rms_norm_eps", None) is None:
        raise unsupported(model_type, "no rms_norm_eps (the final norm is not an RMSNorm)")
    if model_type not in _FAMILIES:
        _FAMILIES[model_type] = _lookup_classes(config)
    return _FAMILIES[model_type]


def _lookup_classes(config: PretrainedConfig) -> SourceFamily:
    """The classes of transformers' base model for `config`, built on the meta device."""
    model_type = config.model_type
    base_cls = MODEL_MAPPING.get(type(config), None)
    if base_cls is None:
        raise unsupported(model_type, "no decoder-only base model class in transformers")
    try:
        with torch.device("meta"):
            base = base_cls(copy.deepcopy(config))
    except Exception as err:  # a config transformers itself cannot build
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise unsupported(model_type, f"its base model does not build ({first})") from None
    needs = {"layers": nn.ModuleList, "embed_tokens": nn.Embedding, "norm": nn.Module}
    for name, cls in needs.items():
        if not isinstance(getattr(base, name, None), cls):
            raise unsupported(model_type, f"its decoder has no {name!r} ({cls.__name__})")
    if not isinstance(getattr(base, "rotary_emb", None), nn.Module):
        raise unsupported(model_type, "no shared rotary embedding ('rotary_emb')")
    embed = base.embed_tokens
    if type(embed).forward is not nn.Embedding.forward and not hasattr(embed, "scalar_embed_scale"):
        raise unsupported(model_type, f"its embedding {type(embed).__name__} does more than scale")
    layer = base.layers[0]
    if not hasattr(layer, "self_attn") or not hasattr(layer.self_attn, "layer_idx"):
        raise unsupported(model_type, "a decoder layer without a `self_attn` attention block")
    moe = [
        n
        for n, mod in layer.named_modules()
        if "expert" in n or "moe" in type(mod).__name__.lower()
    ]
    if moe:
        raise unsupported(model_type, f"a mixture-of-experts block ({moe[0]})")
    rope_cls = type(base.rotary_emb)
    kernels = {"eager"}
    kernels |= {"sdpa"} if base_cls._supports_sdpa else set()
    kernels |= (
        {"flash_attention_2", "flash_attention_3"} if base_cls._supports_flash_attn else set()
    )
    kernels |= {"flex_attention"} if getattr(base_cls, "_supports_flex_attn", False) else set()
    return SourceFamily(
        model_type=model_type,
        layer_cls=type(layer),
        norm_cls=type(base.norm),
        rope_cls=rope_cls,
        rope_per_layer_type="layer_type" in inspect.signature(rope_cls.forward).parameters,
        attn_implementations=frozenset(kernels),
    )


def layer_attention_types(config: PretrainedConfig) -> list[str]:
    """The attention type of every source layer, as the source's own model builds its masks:
    `config.layer_types` where the family has them (Qwen2/3, Gemma-2/3, SmolLM3), else one
    sliding window for every layer when `config.sliding_window` is set (Mistral, Phi-3), else
    full attention."""
    n = config.num_hidden_layers
    types = getattr(config, "layer_types", None)
    if types:
        return list(types)
    if getattr(config, "sliding_window", None) is not None:
        return ["sliding_attention"] * n
    return ["full_attention"] * n


def final_logit_softcap(model: nn.Module) -> float | None:
    """The final-logit soft-cap c of a source (its config) or a looped model (its source's config):
    logits = c·tanh(logits / c) (Gemma-2/3); None for families without one."""
    cfg = getattr(model, "config", None)
    source = getattr(cfg, "source_config", None)  # a looped model's RecurrentConfig
    if isinstance(source, dict):
        return source.get("final_logit_softcapping")
    return getattr(cfg, "final_logit_softcapping", None)


def softcap_logits(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """c·tanh(logits / c), in the source's own order of operations (Gemma2ForCausalLM.forward)."""
    if cap is None:
        return logits
    return torch.tanh(logits / cap) * cap


class ScaledEmbedding(nn.Embedding):
    """An embedding whose output is multiplied by `embed_scale` (Gemma: √h), cast to the weight's
    dtype first as Gemma's own embedding does (so bf16 rounds √h the same way)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx, embed_scale: float):
        super().__init__(num_embeddings, embedding_dim, padding_idx)
        self.embed_scale = float(embed_scale)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        scale = torch.tensor(self.embed_scale, device=self.weight.device).to(self.weight.dtype)
        return super().forward(input_ids) * scale
