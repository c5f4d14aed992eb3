"""The looped model's classes: `RecurrentConfig`, the trunk `RecurrentModel` and
`RecurrentForCausalLM`, registered with the Auto classes at import (the equation, the adapter
inits and where the rest lives: `retroloop.models.recurrent`'s docstring).

Families (DESIGN.md §5; `retroloop.models.families`): the decoder layer, final norm and rotary
embedding are the source's own classes, looked up from its config, never from an allow-list.
Layers keep their source index at construction, so what a layer reads from its index (Qwen2/3
and Gemma layer types, SmolLM3's no-rope layers) stays the source's. The hooks for what a family
keeps outside its decoder layers are applied here: the embedding scale (`ScaledEmbedding`,
`RecurrentConfig.embed_scale`), the final-logit soft-cap (forward and the early-exit probe), a
rotary embedding per layer type, one attention mask per layer type (`recurrent_loop.layer_inputs`:
transformers' `create_causal_mask` / `create_sliding_window_causal_mask`), and eager attention
where the family has no other kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
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
)
from retroloop.models.recurrent_loop import (
    CACHE_KWARG,
    LayerInputs,
    fill_skipped,
    layer_inputs,
    reserve_slots,
    run_layers,
)

ADAPTER_INITS = ("pass_input", "repeat_block")
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
        """norm(C(s_R)) `[B, T, H]` (the head's input) and the KV cache, with e = P(embed(x)) and
        s_{k+1} = B(A([s_k ; e])) for k < R (Geiping et al. 2025, eq. 1).

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
            reserve_slots(cache, P, B, C, R)
        x = layer_inputs(m, inputs_embeds, attention_mask, position_ids, cache)

        e = run_layers(m, "prelude", inputs_embeds, 0, x)
        s = self.initial_state(e)
        n_grad = R if bptt_k is None else min(bptt_k, R)
        grad_enabled = torch.is_grad_enabled()
        probe = cfg.early_exit_kl is not None and not self.training and R > 1
        prev_logp = None
        for k in range(R):
            with torch.set_grad_enabled(grad_enabled and k >= R - n_grad):
                s = run_layers(m, "block", m.adapter(torch.cat([s, e], dim=-1)), P + C + k * B, x)
            if probe and k < R - 1:
                logp = self._probe_logp(s, x)
                if prev_logp is not None:
                    # KL(p_k ‖ p_{k−1}) per row, losses.py's one home for the formula.
                    kl = divergence_from_logprobs(
                        logp.flatten(0, 1), prev_logp.flatten(0, 1), "forward_kl"
                    )
                    if kl.max().item() < cfg.early_exit_kl:
                        if cache is not None:
                            fill_skipped(cache, P + C, B, k, R, inputs_embeds.shape[1])
                        break
                prev_logp = logp
        return m.norm(run_layers(m, "coda", s, P, x)), cache

    def _probe_logp(self, s_B_T_H: torch.Tensor, x: LayerInputs) -> torch.Tensor:
        """log p `[B, 1, V]` of the next token after the last position, were the loop to stop at
        state s: coda, norm, head and soft-cap as in `forward`, then the probe's coda entries are
        cropped off the cache again, so the final coda pass writes them once."""
        m, T = self.model, s_B_T_H.shape[1]
        h_B_1_H = run_layers(m, "coda", s_B_T_H, len(m.prelude), x)[:, -1:]
        if x.cache is not None:
            for j in range(len(m.coda)):
                x.cache.layers[len(m.prelude) + j].crop(-T)
        logits = softcap_logits(self.lm_head(m.norm(h_B_1_H)), final_logit_softcap(self))
        return F.log_softmax(logits.float(), dim=-1)

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
    """The adapter's initial weight for `convert.init` (`retroloop.models.recurrent` describes both)."""
    match init_name:
        case "pass_input":
            return pass_through_weight(hidden, dtype, device)
        case "repeat_block":
            return repeat_block_weight(hidden, dtype, device)
    raise ConfigError(
        f"convert.init: unknown adapter init {init_name!r}; use one of {', '.join(ADAPTER_INITS)}"
    )


AutoConfig.register(RecurrentConfig.model_type, RecurrentConfig, exist_ok=True)
AutoModelForCausalLM.register(RecurrentConfig, RecurrentForCausalLM, exist_ok=True)
