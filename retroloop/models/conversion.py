"""Conversion: a decoder causal LM → the looped model, copying (not sharing) its weights, and
the R = 1 reference it must reproduce (the source with the dropped layers removed).

`convert_from_source` checks the split (source layer indices, increasing, disjoint, ordered
prelude < block < coda) and the recurrence settings, builds `RecurrentForCausalLM` from the
source's config and loads the kept layers, embedding, norm and head into it. `drop_layers` and
`equivalence_max_abs_diff` are the check the convert stage runs: max |Δlogit| at R = 1 (both
adapter inits make R = 1 the layer-dropped source exactly; `retroloop.models.recurrent`).
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import PretrainedConfig

from retroloop.errors import ConfigError
from retroloop.models.families import source_family, unsupported
from retroloop.models.recurrent_model import ADAPTER_INITS, RecurrentConfig, RecurrentForCausalLM


def check_source(source_model: nn.Module) -> PretrainedConfig:
    """The source's config, once its family can be looped (`source_family`) and the instance has
    the decoder the family builds (`model.layers`)."""
    cfg = getattr(source_model, "config", None)
    model_type = getattr(cfg, "model_type", "?")
    if cfg is None:
        raise unsupported(model_type, "no config (not a transformers model)")
    source_family(cfg)
    if not hasattr(getattr(source_model, "model", None), "layers"):
        raise unsupported(model_type, "not a causal LM with a `model.layers` decoder")
    return cfg


def _check_indices(name: str, indices: list[int], n_layers: int) -> list[int]:
    indices = [int(i) for i in indices]
    bad = [i for i in indices if not 0 <= i < n_layers]
    if bad:
        raise ConfigError(
            f"{name}: layer index {bad[0]} is out of range for a {n_layers}-layer model (0..{n_layers - 1})"
        )
    if any(b <= a for a, b in zip(indices, indices[1:], strict=False)):
        raise ConfigError(
            f"{name}: layer indices {indices} must be strictly increasing with no repeats"
        )
    return indices


def _check_split(
    prelude: list[int], block: list[int], coda: list[int], n_layers: int
) -> dict[str, list[int]]:
    """The split's three index lists, each in range and increasing, the block non-empty, and
    the non-empty parts ordered prelude < block < coda without overlap."""
    parts = {
        name: _check_indices(f"split.{name}", idx, n_layers)
        for name, idx in (("prelude", prelude), ("block", block), ("coda", coda))
    }
    if not parts["block"]:
        raise ConfigError("split.block: the recurrent block needs at least one layer")
    chain = [(name, idx) for name, idx in parts.items() if idx]
    for (name_a, a), (name_b, b) in zip(chain, chain[1:], strict=False):
        if b[0] <= a[-1]:
            raise ConfigError(
                f"split: {name_a} {a} and {name_b} {b} overlap or are out of order; use prelude < block < coda"
            )
    return parts


def convert_from_source(
    source_model: nn.Module,
    *,
    prelude: list[int],
    block: list[int],
    coda: list[int],
    recurrence: int = 2,
    state_init_std: float = 0.0087,
    early_exit_kl: float | None = None,
    adapter_init: str = "pass_input",
    source_path: str = "",
    source_sha256: str = "",
) -> RecurrentForCausalLM:
    """Build the looped model from a decoder causal LM, copying (not sharing) its weights.

    `prelude`, `block`, `coda` are source layer indices; they must be increasing, disjoint and
    ordered prelude < block < coda; layers in none of them are dropped. `adapter_init`:
    `pass_input` or `repeat_block` (`retroloop.models.recurrent`); both equal the layer-dropped
    source at R = 1.
    """
    if adapter_init not in ADAPTER_INITS:
        raise ConfigError(
            f"convert.init: unknown adapter init {adapter_init!r}; use one of {', '.join(ADAPTER_INITS)}"
        )
    src_cfg = check_source(source_model)
    parts = _check_split(prelude, block, coda, src_cfg.num_hidden_layers)
    if recurrence < 1:
        raise ConfigError(f"convert.recurrence: must be >= 1, got {recurrence}")
    if state_init_std < 0:
        raise ConfigError(f"convert.state_init_std: must be >= 0, got {state_init_std}")
    if early_exit_kl is not None and early_exit_kl <= 0:
        raise ConfigError(f"convert.early_exit_kl: must be > 0 or null, got {early_exit_kl}")
    embed = source_model.model.embed_tokens
    embed_scale = getattr(embed, "scalar_embed_scale", None)  # Gemma's ScaledWordEmbedding

    config = RecurrentConfig(
        source_config=src_cfg.to_dict(),
        source_model_type=src_cfg.model_type,
        source_model=str(source_path),
        source_sha256=source_sha256,
        prelude_layers=parts["prelude"],
        block_layers=parts["block"],
        coda_layers=parts["coda"],
        recurrence=recurrence,
        state_init_std=state_init_std,
        early_exit_kl=early_exit_kl,
        adapter_init=adapter_init,
        **({} if embed_scale in (None, 1, 1.0) else {"embed_scale": float(embed_scale)}),
        tie_word_embeddings=bool(getattr(src_cfg, "tie_word_embeddings", False)),
        attn_implementation=src_cfg._attn_implementation,
    )
    model = RecurrentForCausalLM(config)
    src, dst = source_model.model, model.model
    dst.embed_tokens.load_state_dict({"weight": src.embed_tokens.weight})
    for name in ("prelude", "block", "coda"):
        for layer, i in zip(getattr(dst, name), parts[name], strict=True):
            layer.load_state_dict(src.layers[i].state_dict())
    dst.norm.load_state_dict(src.norm.state_dict())
    if not config.tie_word_embeddings:
        model.lm_head.load_state_dict(source_model.lm_head.state_dict())
    model.generation_config = copy.deepcopy(source_model.generation_config)
    dtype = next(source_model.parameters()).dtype
    return model.to(dtype=dtype, device=next(source_model.parameters()).device).eval()


def drop_layers(source_model: nn.Module, keep: list[int]) -> nn.Module:
    """A deep copy of the source with only the decoder layers `keep` (the R = 1 reference)."""
    cfg = check_source(source_model)
    keep = _check_indices("keep", keep, cfg.num_hidden_layers)
    model = copy.deepcopy(source_model)
    layers = [model.model.layers[i] for i in keep]
    for j, layer in enumerate(layers):
        layer.self_attn.layer_idx = j
    model.model.layers = nn.ModuleList(layers)
    # deepcopy keeps the model and its layers sharing one config object; shrink it in place.
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in keep]
    model.config.num_hidden_layers = len(keep)
    return model


@torch.no_grad()
def equivalence_max_abs_diff(
    recurrent_model: RecurrentForCausalLM,
    reference_model: nn.Module,
    input_ids_B_T: torch.Tensor,
    attention_mask_B_T: torch.Tensor,
) -> float:
    """max |logit difference| at R = 1 over non-padding positions (0 for a faithful conversion)."""
    device = next(recurrent_model.parameters()).device
    ids_B_T, mask_B_T = input_ids_B_T.to(device), attention_mask_B_T.to(device)
    got_B_T_V = recurrent_model(
        input_ids=ids_B_T, attention_mask=mask_B_T, num_recurrence=1, use_cache=False
    ).logits
    ref_device = next(reference_model.parameters()).device
    want_B_T_V = reference_model(
        input_ids=ids_B_T.to(ref_device), attention_mask=mask_B_T.to(ref_device), use_cache=False
    ).logits
    diff_B_T_V = (got_B_T_V.float() - want_B_T_V.to(device).float()).abs()
    return float(diff_B_T_V[mask_B_T.bool()].max())
