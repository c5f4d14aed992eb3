"""Retrofitted depth recurrence for any dense decoder transformers ships (Llama, Qwen2/3, OLMo-2,
Mistral, Gemma-2/3, Phi-3, SmolLM3, ...), built from the source's own classes.

The model (McLeish et al. 2025, "retrofitted recurrence", §3; Geiping et al. 2025, Huginn, eq. 1):

    e       = P(embed(x))                       prelude: the kept first layers
    s_0     ~ TruncNormal(0, σ²) on [−3σ, 3σ]    σ = `state_init_std` (0.0087)
    s_{k+1} = B(A([s_k ; e]))   for k < R        A: bias-free Linear(2h → h); B: the recurrent block
    logits  = head(norm(C(s_R)))                 coda: the kept last layers

Two initialisations of A (`adapter_init`, DESIGN.md §5), both reproducing the source with the
dropped layers removed at R = 1 (a random frozen adapter, the reference code's default, does not):

- `pass_input`: A = `[0 | I]`, s_0 ~ TruncNormal. A passes e through and multiplies s_k by zero,
  so every R gives the same output until the state half of A learns.
- `repeat_block`: A = `[I | 0]`, s_0 = e. A passes the state through, so R = k is exactly the
  block applied k times (layer repetition; the reference code's embed-init / skip-adapter modes).
  In training mode s_0 = e + TruncNormal noise, as pass-input's s_0 is noise around 0.

KV cache: one entry per (iteration, layer). Cache slot of prelude layer i is i, of coda layer
j is P + j, of block layer j at iteration k is P + C + k·B + j, so any R works with one
lazily growing `DynamicCache`; R must stay the same across calls that share a cache (the cache
records the R it was filled with and any other R is refused). Every slot keeps the full keys/values,
sliding-window layers included: the window lives in the mask.

Families (DESIGN.md §5; `retroloop.models.families`): the decoder layer, final norm and rotary
embedding are the source's own classes, looked up from its config, never from an allow-list.
Layers keep their source index at construction, so what a layer reads from its index (Qwen2/3
and Gemma layer types, SmolLM3's no-rope layers) stays the source's. The hooks for what a family
keeps outside its decoder layers are applied here: the embedding scale (`ScaledEmbedding`,
`RecurrentConfig.embed_scale`), the final-logit soft-cap (forward and the early-exit probe), a
rotary embedding per layer type, one attention mask per layer type (transformers'
`create_causal_mask` / `create_sliding_window_causal_mask`), and eager attention where the
family has no other kernel.

Training samples R per step (`sample_recurrence`, Huginn §3: rate ~ LogNormal, R = Poisson + 1),
ramps its mean (`recurrence_mean_at`) and backpropagates through the last `bptt_k` iterations
only (truncated BPTT).
"""

from __future__ import annotations

import copy
import inspect
import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_utils import PreTrainedModel, slice_logits_to_keep
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from retroloop.errors import ConfigError
from retroloop.losses import divergence_from_logprobs
from retroloop.models.families import (
    ScaledEmbedding,
    final_logit_softcap,
    layer_attention_types,
    softcap_logits,
    source_family,
    unsupported,
)

ADAPTER_INITS = ("pass_input", "repeat_block")
# transformers 5.24 renamed the KV cache argument `past_key_values` to `cache` everywhere
# (model and decoder-layer kwargs, create_causal_mask, model outputs); 5.23 knows only the old
# name. Everything here passes the cache under the name this version uses, so generate() hands
# the looped model its cache on both, and no call goes through the deprecated alias.
CACHE_KWARG = (
    "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"
)
# Fields mirrored from the source config, for generation and Hugging Face utilities.
_MIRRORED = (
    "vocab_size hidden_size num_attention_heads num_key_value_heads head_dim max_position_embeddings "
    "initializer_range tie_word_embeddings bos_token_id eos_token_id pad_token_id"
).split()


class RecurrentConfig(PretrainedConfig):
    """Config of a looped model: the source config plus the split and the recurrence settings.

    `num_hidden_layers` counts the physical decoder layers (P + B + C), not the unrolled depth.
    `embed_scale` (Gemma: the embeddings × √h, the source embedding's own scale) is set only for a
    family that scales (an extra key, so a Llama conversion's config.json is what it always was).
    """

    model_type = "retroloop_recurrent"
    keys_to_ignore_at_inference = [CACHE_KWARG]

    source_config: dict | None = None  # the source model's config.to_dict()
    source_model_type: str = "llama"
    source_model: str = ""  # path of the source save_pretrained directory
    source_sha256: str = ""  # its content hash (lineage)
    prelude_layers: list[int] | None = None  # source layer indices kept, in order
    block_layers: list[int] | None = None
    coda_layers: list[int] | None = None
    recurrence: int = 2  # default R when forward() gets no num_recurrence
    state_init_std: float = 0.0087  # σ of s_0
    adapter_init: str = (
        "pass_input"  # pass_input: A = [0 | I], s_0 ~ noise; repeat_block: [I | 0], s_0 = e
    )
    early_exit_kl: float | None = None  # inference only; see RecurrentForCausalLM.forward
    vocab_size: int | None = None
    hidden_size: int | None = None
    num_hidden_layers: int | None = None
    num_attention_heads: int | None = None
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int | None = None
    initializer_range: float | None = None
    tie_word_embeddings: bool | None = None
    use_cache: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    def __post_init__(self, **kwargs):
        source = self.source_config or {}
        for name in _MIRRORED:
            if getattr(self, name) is None and name in source:
                setattr(self, name, source[name])
        self.prelude_layers = list(self.prelude_layers or [])
        self.block_layers = list(self.block_layers or [])
        self.coda_layers = list(self.coda_layers or [])
        if self.num_hidden_layers is None:
            self.num_hidden_layers = (
                len(self.prelude_layers) + len(self.block_layers) + len(self.coda_layers)
            )
        super().__post_init__(**kwargs)

    def layer_config(self) -> PretrainedConfig:
        """The source config object (LlamaConfig / Qwen2Config) the decoder layers are built from."""
        return CONFIG_MAPPING[self.source_model_type].from_dict(dict(self.source_config or {}))


class RecurrentModel(nn.Module):
    """The trunk: embeddings, prelude, input adapter A, recurrent block, coda, final norm."""

    def __init__(self, config: RecurrentConfig):
        super().__init__()
        self.layer_config = config.layer_config()
        self.layer_config._attn_implementation = config._attn_implementation
        lc, h = self.layer_config, config.hidden_size
        self.family = family = source_family(lc)
        embed_scale = getattr(config, "embed_scale", None)
        if embed_scale is None:
            self.embed_tokens = nn.Embedding(config.vocab_size, h, config.pad_token_id)
        else:
            self.embed_tokens = ScaledEmbedding(
                config.vocab_size, h, config.pad_token_id, embed_scale
            )
        # Layers keep their source index at construction (Qwen2/3 and Gemma read their layer type
        # from it, SmolLM3 whether it uses rope); the cache slot is set per call in `forward`.
        self.prelude = nn.ModuleList(family.layer_cls(lc, i) for i in config.prelude_layers)
        self.adapter = nn.Linear(2 * h, h, bias=False)  # A([s ; e]); init: see adapter_weight
        self.block = nn.ModuleList(family.layer_cls(lc, i) for i in config.block_layers)
        self.coda = nn.ModuleList(family.layer_cls(lc, i) for i in config.coda_layers)
        self.norm = family.norm_cls(h, eps=lc.rms_norm_eps)
        self.rotary_emb = family.rope_cls(config=lc)
        types = layer_attention_types(lc)
        self.attention_types = {
            name: [types[i] for i in idx]
            for name, idx in (
                ("prelude", config.prelude_layers),
                ("block", config.block_layers),
                ("coda", config.coda_layers),
            )
        }


class RecurrentForCausalLM(PreTrainedModel, GenerationMixin):
    """prelude → (A → block) × R → coda → head, registered with the Auto classes at import."""

    config_class = RecurrentConfig
    config: RecurrentConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules: list[str] = []  # set per instance: the source family's decoder layer
    _skip_keys_device_placement = [CACHE_KWARG]
    _supports_flash_attn = True
    _supports_sdpa = True
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: RecurrentConfig):
        super().__init__(config)
        self.model = RecurrentModel(config)
        self._no_split_modules = [self.model.family.layer_cls.__name__]
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if module is self.model.rotary_emb:
            # Non-persistent buffers are rebuilt on load, and transformers' generic init knows only
            # a single `inv_freq`: take every buffer from a fresh copy of the source's own class
            # (Gemma-3 keeps one inv_freq per layer type).
            with torch.device("cpu"):
                fresh = self.model.family.rope_cls(config=self.model.layer_config)
            for name, buffer in fresh.named_buffers(recurse=False):
                init.copy_(getattr(module, name), buffer)
        if module is self.model.adapter:
            weight = adapter_weight(
                self.config.adapter_init,
                module.out_features,
                module.weight.dtype,
                module.weight.device,
            )
            init.copy_(module.weight, weight)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        num_recurrence: int | None = None,
        bptt_k: int | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """One forward pass with R = `num_recurrence` (default `config.recurrence`) iterations:
        `final_hidden_states`, then the head on the `logits_to_keep` positions.

        The KV cache arrives as `cache` (transformers >= 5.24's generate) or `past_key_values`
        (older generate) and is returned under the name this version's outputs use."""
        if cache is None:
            cache = kwargs.pop("past_key_values", None)
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        hidden, cache = self.final_hidden_states(
            input_ids, attention_mask, position_ids, cache, inputs_embeds,
            use_cache=use_cache, num_recurrence=num_recurrence, bptt_k=bptt_k,
        )  # fmt: skip
        logits = self.lm_head(slice_logits_to_keep(hidden, logits_to_keep))
        logits = softcap_logits(logits, final_logit_softcap(self))
        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs
            )
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, **{CACHE_KWARG: cache if use_cache else None}
        )

    def final_hidden_states(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        *,
        use_cache: bool = False,
        num_recurrence: int | None = None,
        bptt_k: int | None = None,
    ) -> tuple[torch.Tensor, Cache | None]:
        """norm(C(s_R)) `[B, T, H]` (the head's input) and the KV cache.

        `bptt_k`: only the last k iterations build a graph; the earlier ones run under
        `torch.no_grad()` (truncated BPTT, McLeish et al. §3). The prelude still gets gradients
        through e, which every iteration reads.

        Early exit (`config.early_exit_kl`, eval mode only): after each iteration k ≥ 1 the coda
        and head are probed on the last position, and the loop stops once
        max over the batch of KL(p_k ‖ p_{k−1}) < threshold (Geiping et al. §6). With a KV cache the
        probe's coda entries are cropped again, and the block entries of the skipped iterations are
        filled with the last computed iteration's keys/values (the fixed-point approximation
        s_{k+1} ≈ s_k), so every slot keeps the same length and later tokens can run all R.
        """
        m, cfg = self.model, self.config
        # The layers read their config's attention implementation: follow set_attn_implementation,
        # falling back to eager where the source family has no such kernel (Gemma-2's soft-capped
        # attention has no sdpa path, yet the looped model loads with sdpa by default).
        impl = cfg._attn_implementation
        m.layer_config._attn_implementation = (
            impl if impl in m.family.attn_implementations else "eager"
        )
        R = cfg.recurrence if num_recurrence is None else num_recurrence
        if R < 1 or (bptt_k is not None and bptt_k < 1):
            raise ConfigError(f"num_recurrence ({R}) and bptt_k ({bptt_k}) must be >= 1")
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = m.embed_tokens(input_ids)  # × embed_scale for Gemma (ScaledEmbedding)
        if use_cache and cache is None:
            cache = DynamicCache()
        P, B, C = len(m.prelude), len(m.block), len(m.coda)
        if cache is not None:
            _reserve_slots(cache, P, B, C, R)
        T = inputs_embeds.shape[1]
        if position_ids is None:
            past = cache.get_seq_length() if cache is not None else 0
            position_ids = (torch.arange(T, device=inputs_embeds.device) + past).unsqueeze(0)
        # One mask per attention type the kept layers use (transformers' own mask builders, as the
        # source model's forward does); every cache slot holds full keys, so one mask fits all.
        needed = sorted({t for types in m.attention_types.values() for t in types})
        mask_fns = {"full_attention": create_causal_mask,
                    "sliding_attention": create_sliding_window_causal_mask}  # fmt: skip
        masks = {
            t: mask_fns[t](
                config=m.layer_config,
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                position_ids=position_ids,
                **{CACHE_KWARG: cache},
            )
            for t in needed
        }
        if m.family.rope_per_layer_type:  # Gemma-3: local and global layers rotate differently
            ropes = {t: m.rotary_emb(inputs_embeds, position_ids, t) for t in needed}
        else:
            rope = m.rotary_emb(inputs_embeds, position_ids=position_ids)
            ropes = dict.fromkeys(needed, rope)

        def run(name: str, hidden: torch.Tensor, first_slot: int) -> torch.Tensor:
            for j, (layer, kind) in enumerate(
                zip(getattr(m, name), m.attention_types[name], strict=True)
            ):
                source_idx = layer.self_attn.layer_idx
                layer.self_attn.layer_idx = first_slot + j  # the cache slot this call writes
                try:
                    hidden = layer(
                        hidden,
                        attention_mask=masks[kind],
                        position_ids=position_ids,
                        use_cache=cache is not None,
                        **{CACHE_KWARG: cache},
                        position_embeddings=ropes[kind],
                    )
                finally:  # the layer keeps its source index between calls
                    layer.self_attn.layer_idx = source_idx
            return hidden

        def head_logp(h_B_1_H: torch.Tensor) -> torch.Tensor:
            logits = softcap_logits(self.lm_head(m.norm(h_B_1_H)), final_logit_softcap(self))
            return F.log_softmax(logits.float(), dim=-1)

        e = run("prelude", inputs_embeds, 0)
        s = self.initial_state(e)
        n_grad = R if bptt_k is None else min(bptt_k, R)
        grad_enabled = torch.is_grad_enabled()
        probe = cfg.early_exit_kl is not None and not self.training and R > 1
        prev_logp = None
        for k in range(R):
            with torch.set_grad_enabled(grad_enabled and k >= R - n_grad):
                s = run("block", m.adapter(torch.cat([s, e], dim=-1)), P + C + k * B)
            if probe and k < R - 1:
                h_last = run("coda", s, P)[:, -1:]
                if cache is not None:
                    for j in range(C):
                        cache.layers[P + j].crop(-T)
                logp = head_logp(h_last)
                if prev_logp is not None:
                    # KL(p_k ‖ p_{k−1}) per row, losses.py's one home for the formula.
                    kl = divergence_from_logprobs(
                        logp.flatten(0, 1), prev_logp.flatten(0, 1), "forward_kl"
                    )
                    if kl.max().item() < cfg.early_exit_kl:
                        if cache is not None:
                            _fill_skipped(cache, P + C, B, k, R, T)
                        break
                prev_logp = logp
        return m.norm(run("coda", s, P)), cache

    def initial_state(self, e_B_T_H: torch.Tensor) -> torch.Tensor:
        """s_0 = c + TruncNormal(0, σ²) clipped at ±3σ (Huginn §3), from the global torch RNG,
        with c = 0 (`pass_input`) or c = e (`repeat_block`, so s_1 = block(e) as in the source).

        In eval mode s_0 is its mean, c: inference is then a deterministic function, so a
        sampler's and a learner's log-probs (OPD's importance ratio) and repeated evaluations
        agree exactly. Training keeps the random draw, which regularises the adapter.
        """
        match self.config.adapter_init:
            case "repeat_block":
                s = e_B_T_H.clone()
            case _:
                s = torch.zeros_like(e_B_T_H)
        std = self.config.state_init_std
        if std > 0 and self.training:
            noise = torch.empty_like(s)
            nn.init.trunc_normal_(noise, mean=0.0, std=std, a=-3 * std, b=3 * std)
            s = s + noise
        return s


def pass_through_weight(hidden: int, dtype: torch.dtype | None = None, device=None) -> torch.Tensor:
    """`[0 | I]` of shape (h, 2h): A([s ; e]) = e."""
    zeros = torch.zeros(hidden, hidden, dtype=dtype, device=device)
    return torch.cat([zeros, torch.eye(hidden, dtype=dtype, device=device)], dim=1)


def repeat_block_weight(hidden: int, dtype: torch.dtype | None = None, device=None) -> torch.Tensor:
    """`[I | 0]` of shape (h, 2h): A([s ; e]) = s, so the loop is the block repeated."""
    return pass_through_weight(hidden, dtype, device).roll(hidden, dims=1)


def adapter_weight(init_name: str, hidden: int, dtype=None, device=None) -> torch.Tensor:
    """The adapter's initial weight for `convert.init` (see the module docstring)."""
    match init_name:
        case "pass_input":
            return pass_through_weight(hidden, dtype, device)
        case "repeat_block":
            return repeat_block_weight(hidden, dtype, device)
    raise ConfigError(
        f"convert.init: unknown adapter init {init_name!r}; use one of {', '.join(ADAPTER_INITS)}"
    )


def _reserve_slots(cache: Cache, P: int, B: int, C: int, R: int) -> None:
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


def _fill_skipped(
    cache: DynamicCache, block_start: int, B: int, last_k: int, R: int, T: int
) -> None:
    """Copy the last computed iteration's new keys/values into the slots of skipped iterations."""
    for j in range(B):
        src = cache.layers[block_start + last_k * B + j]
        keys, values = src.keys[:, :, -T:], src.values[:, :, -T:]
        for k in range(last_k + 1, R):
            cache.update(keys, values, block_start + k * B + j)


# --------------------------------------------------------------------------- conversion


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
    `pass_input` or `repeat_block` (module docstring); both equal the layer-dropped source at R = 1.
    """
    if adapter_init not in ADAPTER_INITS:
        raise ConfigError(
            f"convert.init: unknown adapter init {adapter_init!r}; use one of {', '.join(ADAPTER_INITS)}"
        )
    src_cfg = check_source(source_model)
    n = src_cfg.num_hidden_layers
    parts = {
        name: _check_indices(f"split.{name}", idx, n)
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


# --------------------------------------------------------------------------- training-time recurrence


def sample_recurrence(
    mean: float, sigma: float, generator: torch.Generator, max_recurrence: int
) -> int:
    """R for one training step: rate ~ LogNormal(log μ − σ²/2, σ), R = Poisson(rate) + 1, R ≤ cap.

    As in Huginn (Geiping et al. 2025, §3) and McLeish et al. 2025: E[rate] = μ, so before the
    cap E[R] = μ + 1 (the +1 guarantees at least one iteration). Pass μ − 1 for E[R] = μ.
    """
    if mean <= 0 or sigma < 0 or max_recurrence < 1:
        raise ConfigError(
            f"recurrence schedule: need mean > 0, sigma >= 0, max_recurrence >= 1 (got {mean}, {sigma}, {max_recurrence})"
        )
    log_rate = torch.normal(math.log(mean) - 0.5 * sigma**2, sigma, size=(1,), generator=generator)
    sampled = int(torch.poisson(log_rate.exp(), generator=generator).item()) + 1
    return min(sampled, max_recurrence)


def recurrence_mean_at(
    step: int, total_steps: int, mean_start: float, mean_end: float, ramp_fraction: float
) -> float:
    """μ at `step`: linear from `mean_start` to `mean_end` over the first `ramp_fraction` of the steps, then flat."""
    ramp_steps = ramp_fraction * total_steps
    if ramp_steps <= 0:
        return float(mean_end)
    frac = min(max(step / ramp_steps, 0.0), 1.0)
    return float(mean_start + frac * (mean_end - mean_start))


AutoConfig.register(RecurrentConfig.model_type, RecurrentConfig, exist_ok=True)
AutoModelForCausalLM.register(RecurrentConfig, RecurrentForCausalLM, exist_ok=True)
