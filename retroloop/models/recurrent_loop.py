"""What one forward call of the looped model feeds its decoder layers, and where it caches them.

`RecurrentForCausalLM.final_hidden_states` (recurrent_model.py) reads as the model's equation,
s_{k+1} = B(A([s_k ; e])) for k < R; the plumbing below it lives here: the attention masks and
rotary embeddings each layer type reads (`layer_inputs`), running a stack of layers at its KV
cache slots (`run_layers`), and the cache's slot layout (`reserve_slots`, `fill_skipped`).

KV cache: one entry per (iteration, layer). Cache slot of prelude layer i is i, of coda layer
j is P + j, of block layer j at iteration k is P + C + k·B + j, so any R works with one
lazily growing `DynamicCache`; R must stay the same across calls that share a cache (the cache
records the R it was filled with and any other R is refused). Every slot keeps the full keys/values,
sliding-window layers included: the window lives in the mask.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from retroloop.errors import ConfigError

# transformers 5.24 renamed the KV cache argument `past_key_values` to `cache` everywhere
# (model and decoder-layer kwargs, create_causal_mask, model outputs); 5.23 knows only the old
# name. Everything here passes the cache under the name this version uses, so generate() hands
# the looped model its cache on both, and no call goes through the deprecated alias.
CACHE_KWARG = (
    "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"
)
_MASK_FNS = {"full_attention": create_causal_mask,
             "sliding_attention": create_sliding_window_causal_mask}  # fmt: skip


@dataclass(frozen=True)
class LayerInputs:
    """What every decoder layer of one call reads besides its hidden state."""

    masks: dict[str, torch.Tensor | None]  # per attention type
    ropes: dict[str, tuple[torch.Tensor, torch.Tensor]]  # (cos, sin) per attention type
    position_ids: torch.LongTensor
    cache: Cache | None


def layer_inputs(
    trunk: nn.Module,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.LongTensor | None,
    cache: Cache | None,
) -> LayerInputs:
    """One mask and one rotary embedding per attention type the kept layers of `trunk` (a
    `RecurrentModel`) use, built by transformers' own mask builders as the source model's forward
    does; every cache slot holds full keys, so one mask fits all. Positions default to the tokens
    after what `cache` already holds."""
    if position_ids is None:
        past = cache.get_seq_length() if cache is not None else 0
        T = inputs_embeds.shape[1]
        position_ids = (torch.arange(T, device=inputs_embeds.device) + past).unsqueeze(0)
    needed = sorted({t for types in trunk.attention_types.values() for t in types})
    masks = {
        t: _MASK_FNS[t](
            config=trunk.layer_config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            **{CACHE_KWARG: cache},
        )
        for t in needed
    }
    if trunk.family.rope_per_layer_type:  # Gemma-3: local and global layers rotate differently
        ropes = {t: trunk.rotary_emb(inputs_embeds, position_ids, t) for t in needed}
    else:
        rope = trunk.rotary_emb(inputs_embeds, position_ids=position_ids)
        ropes = dict.fromkeys(needed, rope)
    return LayerInputs(masks, ropes, position_ids, cache)


def run_layers(
    trunk: nn.Module, name: str, hidden: torch.Tensor, first_slot: int, x: LayerInputs
) -> torch.Tensor:
    """`hidden` through the layers `trunk.<name>` ("prelude", "block" or "coda"), layer j
    writing cache slot `first_slot + j`; each layer keeps its source index between calls."""
    for j, (layer, kind) in enumerate(
        zip(getattr(trunk, name), trunk.attention_types[name], strict=True)
    ):
        source_idx = layer.self_attn.layer_idx
        layer.self_attn.layer_idx = first_slot + j  # the cache slot this call writes
        try:
            hidden = layer(
                hidden,
                attention_mask=x.masks[kind],
                position_ids=x.position_ids,
                use_cache=x.cache is not None,
                **{CACHE_KWARG: x.cache},
                position_embeddings=x.ropes[kind],
            )
        finally:  # the layer keeps its source index between calls
            layer.self_attn.layer_idx = source_idx
    return hidden


def reserve_slots(cache: Cache, P: int, B: int, C: int, R: int) -> None:
    """Grow a DynamicCache to the P + C + R·B slots of R iterations (one that `generate` sized
    from the config too) and refuse a cache filled at another R: its coda would read keys and
    values of two different depths. The cache records its R (`retroloop_recurrence`); a cache
    without the record is checked by which slots hold tokens."""
    if not isinstance(cache, DynamicCache):
        raise ValueError(f"the looped model needs a DynamicCache, got {type(cache).__name__}")
    if cache.get_seq_length(0):  # checked before the cache grows: a refusal leaves it as it was
        filled = getattr(cache, "retroloop_recurrence", None)
        if filled is None:  # which slots hold tokens tells the R they were written with
            used = sum(1 for i in range(len(cache.layers)) if cache.get_seq_length(i))
            filled = (used - P - C) // B if B else R
        if filled != R:
            raise ConfigError(
                f"num_recurrence: this KV cache was filled at R = {filled} and cannot be reused "
                f"at R = {R}; keep num_recurrence the same across calls that share one cache"
            )
    while len(cache.layers) < P + C + R * B:
        cache.layers.append(DynamicLayer())
    cache.retroloop_recurrence = R


def fill_skipped(
    cache: DynamicCache, block_start: int, B: int, last_k: int, R: int, T: int
) -> None:
    """Copy the last computed iteration's new keys/values into the slots of skipped iterations."""
    for j in range(B):
        src = cache.layers[block_start + last_k * B + j]
        keys, values = src.keys[:, :, -T:], src.values[:, :, -T:]
        for k in range(last_k + 1, R):
            cache.update(keys, values, block_start + k * B + j)
