"""Every decoder family the looped model is built from, without a download (issue 20.1-20.2).

Each family's tiny config is built here with its distinctive options switched on (a sliding window
shorter than the sequence, soft-caps, q/k-norm, rope scaling, local/global rope, no-rope layers,
fused projections), random weights (seeded) and a BPE tokenizer trained in code. Per family:

- the converted model at R = 1 equals the layer-dropped source (both adapter inits), and the check
  can fail (the full source differs);
- greedy generation with the KV cache equals cache-free decoding at R = 1, 2, 4;
- LoRA `all-linear` targets exactly the family's projections, the recurrence adapter trains in
  full, and one distillation step against the source lowers KL;
- the adapter round-trips through `PeftModel.from_pretrained`, and `retroloop export` writes a
  merged model that loads with transformers and gives the same logits.

Then each hook that carries what a family keeps outside its decoder layers (embedding scale,
final-logit soft-cap, sliding-window masks, rope per layer type, source layer index at
construction, the eager fallback of soft-capped attention) is removed in turn, and the
equivalence fails.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

import retroloop.models.recurrent_model as recurrent_model
from retroloop.errors import ModelError
from retroloop.losses import divergence_from_logprobs
from retroloop.models.families import TESTED_FAMILIES
from retroloop.models.loading import build_tiny_tokenizer, load_adapter, load_model
from retroloop.models.lora import lora_config_for
from retroloop.models.recurrent import (
    convert_from_source,
    drop_layers,
    equivalence_max_abs_diff,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matmuls: 2 threads spin on 2 cores

WINDOW = 6  # sliding window, shorter than every sequence below
SPLIT = dict(prelude=[0], block=[2, 3], coda=[5])  # of 6 layers; 1 and 4 are dropped
KEPT = [0, 2, 3, 5]
# The family's distinctive options (on top of COMMON); each one changes the model's output.
FAMILIES: dict[str, dict] = {
    # Llama-3.x rope scaling: low frequencies stretched beyond the original 16 positions.
    "llama": dict(
        rope_parameters=dict(
            rope_type="llama3",
            rope_theta=10000.0,
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=16,
        ),
    ),  # fmt: skip
    # Qwen2 `layer_types`: layers from 2 on slide over WINDOW tokens.
    "qwen2": dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=2),
    "qwen3": dict(),  # q/k-norm inside the attention
    "olmo2": dict(),  # post-attention / post-MLP norms and full-width q/k-norm
    "mistral": dict(sliding_window=WINDOW),  # one window for every layer
    # Alternating local/global layers, soft-capped attention (eager only) and final logits.
    "gemma2": dict(
        sliding_window=WINDOW,
        final_logit_softcapping=3.0,
        attn_logit_softcapping=5.0,
        query_pre_attn_scalar=16,
    ),  # fmt: skip
    # Local/global layers with a rotary embedding each (global: linear-scaled, other base).
    "gemma3_text": dict(
        sliding_window=WINDOW,
        sliding_window_pattern=2,
        final_logit_softcapping=3.0,
        query_pre_attn_scalar=16,
        rope_parameters={
            "full_attention": dict(rope_type="linear", factor=4.0, rope_theta=1e6),
            "sliding_attention": dict(rope_type="default", rope_theta=1e4),
        },
    ),  # fmt: skip
    # Fused qkv_proj / gate_up_proj, partial rotary, one window for every layer.
    "phi3": dict(sliding_window=WINDOW, partial_rotary_factor=0.5),
    # No-rope layers: layer 2 (kept, in the block) does not rotate; slot index 1 would.
    "smollm3": dict(no_rope_layers=[1, 0, 0, 1, 1, 0]),
}
assert set(FAMILIES) == set(TESTED_FAMILIES)
CORPUS = [
    "The looped model runs its block R times; the prelude embeds and the coda decodes.",
    "def add(a, b):\n    return a + b\n",
    "Sliding windows, soft caps and rotary embeddings live outside or inside decoder layers.",
] * 4


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer(CORPUS, 300)


def tiny_family(family: str, tokenizer, seed: int = 0, **overrides) -> torch.nn.Module:
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        # Peaked logits, so greedy tokens vary and a wrong cache or mask changes them.
        initializer_range=0.2,
    )
    config = AutoConfig.for_model(family, **{**common, **FAMILIES[family], **overrides})
    torch.manual_seed(seed)
    model = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)](config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = None  # generate the full length
    return model


def batch(tokenizer, T: int = 16, left_pad: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows of T tokens (longer than the window), the first left-padded by `left_pad`."""
    g = torch.Generator().manual_seed(1)
    ids_B_T = torch.randint(5, len(tokenizer), (2, T), generator=g)
    mask_B_T = torch.ones_like(ids_B_T)
    ids_B_T[0, :left_pad] = tokenizer.pad_token_id
    mask_B_T[0, :left_pad] = 0
    return ids_B_T, mask_B_T


def mix_state(looped, seed: int = 2) -> None:
    """An adapter that reads state and input, so every iteration changes the output."""
    h = looped.config.hidden_size
    g = torch.Generator().manual_seed(seed)
    eye = torch.eye(h)
    with torch.no_grad():
        looped.model.adapter.weight.copy_(
            torch.cat([0.5 * eye, 0.5 * eye], 1) + 0.05 * torch.randn(h, 2 * h, generator=g)
        )


def r1_diff(looped, source, tokenizer) -> float:
    ids_B_T, mask_B_T = batch(tokenizer)
    return equivalence_max_abs_diff(looped, drop_layers(source, KEPT), ids_B_T, mask_B_T)


# --------------------------------------------------------------------------- every family


@pytest.mark.parametrize("family", TESTED_FAMILIES)
def test_family_converts_exactly_generates_with_cache_and_trains(family, tokenizer, tmp_path):
    source = tiny_family(family, tokenizer)
    ids_B_T, mask_B_T = batch(tokenizer)
    reference = drop_layers(source, KEPT)
    for init in ("pass_input", "repeat_block"):
        looped = convert_from_source(source, **SPLIT, recurrence=1, adapter_init=init)
        assert equivalence_max_abs_diff(looped, reference, ids_B_T, mask_B_T) <= 1e-5, init
    assert equivalence_max_abs_diff(looped, source, ids_B_T, mask_B_T) > 1e-3  # can fail
    base_dir = tmp_path / "base"  # the conversion as convert publishes it
    looped.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    # What save_pretrained drops (non-persistent buffers: rope per layer type) is rebuilt on load.
    assert equivalence_max_abs_diff(load_model(base_dir), reference, ids_B_T, mask_B_T) <= 1e-5

    # Greedy generation with the cache equals cache-free decoding at R = 1, 2, 4, past the window.
    mix_state(looped)
    for R in (1, 2, 4):
        kw = dict(input_ids=ids_B_T[:, :10], attention_mask=mask_B_T[:, :10], max_new_tokens=8,
                  do_sample=False, output_scores=True, return_dict_in_generate=True,
                  num_recurrence=R)  # fmt: skip
        cached, uncached = looped.generate(**kw), looped.generate(**kw, use_cache=False)
        assert torch.equal(cached.sequences, uncached.sequences), R
        diff = max(
            (a - b).abs().max().item() for a, b in zip(cached.scores, uncached.scores, strict=True)
        )
        assert diff < 1e-4, (R, diff)

    # LoRA all-linear: exactly the family's own projections, plus the adapter trained in full.
    from peft import get_peft_model

    projections = {
        name.rsplit(".", 1)[-1]
        for name, mod in source.model.layers[0].named_modules()
        if isinstance(mod, torch.nn.Linear)
    }
    lora_cfg = lora_config_for(looped, r=16, alpha=32, dropout=0.0)
    assert set(lora_cfg.target_modules) == projections
    student = get_peft_model(load_model(base_dir), lora_cfg)
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    assert any("adapter" in n and "modules_to_save" in n for n in trainable)
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable if ".lora_" in n} == (
        projections
    )

    # One distillation step (forward KL to the source at R = 2) lowers KL.
    with torch.no_grad():
        teacher_logp = source(input_ids=ids_B_T, attention_mask=mask_B_T).logits.log_softmax(-1)
    keep_B_T = mask_B_T.bool()

    def kl() -> torch.Tensor:
        logits = student(input_ids=ids_B_T, attention_mask=mask_B_T, num_recurrence=2).logits
        return divergence_from_logprobs(
            teacher_logp[keep_B_T], logits.log_softmax(-1)[keep_B_T], "forward_kl"
        ).mean()

    student.train()
    opt = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=1e-3)
    before = kl()
    before.backward()
    opt.step()
    student.eval()
    with torch.no_grad():
        after = kl()
        assert after < before, (before.item(), after.item())
        want_B_T_V = student(input_ids=ids_B_T, attention_mask=mask_B_T).logits

    # The adapter round-trips through PEFT, and `retroloop export` merges it into a model that
    # loads with transformers alone and gives the same logits.
    from retroloop.export import export

    student.save_pretrained(tmp_path / "adapter")
    config_file = tmp_path / "adapter" / "adapter_config.json"
    adapter_cfg = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**adapter_cfg, "base_model_name_or_path": "base"}))
    reloaded = load_adapter(load_model(base_dir), tmp_path / "adapter").eval()
    with torch.no_grad():
        got_B_T_V = reloaded(input_ids=ids_B_T, attention_mask=mask_B_T).logits
    assert (got_B_T_V - want_B_T_V).abs()[keep_B_T].max() <= 1e-5
    cwd = Path.cwd()
    try:
        import os

        os.chdir(tmp_path)
        export(tmp_path / "adapter", "exported")
    finally:
        os.chdir(cwd)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "exported").eval()
    with torch.no_grad():
        got_B_T_V = merged(input_ids=ids_B_T, attention_mask=mask_B_T).logits
    assert (got_B_T_V - want_B_T_V).abs()[keep_B_T].max() <= 1e-4


# --------------------------------------------------------------------------- each hook matters


def _no_embed_scale(looped, source):
    looped.model.embed_tokens.embed_scale = 1.0


def _no_softcap(looped, source, monkeypatch):
    monkeypatch.setattr(recurrent_model, "final_logit_softcap", lambda model: None)


def _no_window(looped, source):
    looped.model.attention_types = {
        k: ["full_attention"] * len(v) for k, v in looped.model.attention_types.items()
    }


def _one_rope(looped, source):  # every layer rotates as the global layers do
    rope = looped.model.rotary_emb
    forward = rope.forward
    rope.forward = lambda x, position_ids, layer_type: forward(x, position_ids, "full_attention")


def _slot_index(looped, source):  # layers built with their slot index instead of the source's
    m, lc = looped.model, looped.model.layer_config
    for j, layer in enumerate([*m.prelude, *m.block, *m.coda]):
        layer.self_attn.use_rope = lc.no_rope_layers[j]


HOOKS = [
    ("gemma2", "embed_scale", _no_embed_scale),
    ("gemma3_text", "embed_scale", _no_embed_scale),
    ("gemma2", "final_logit_softcap", _no_softcap),
    ("gemma3_text", "final_logit_softcap", _no_softcap),
    ("mistral", "sliding_window_mask", _no_window),
    ("phi3", "sliding_window_mask", _no_window),
    ("qwen2", "sliding_window_mask", _no_window),
    ("gemma2", "sliding_window_mask", _no_window),
    ("gemma3_text", "sliding_window_mask", _no_window),
    ("gemma3_text", "rope_per_layer_type", _one_rope),
    ("smollm3", "source_layer_index", _slot_index),
]


@pytest.mark.parametrize(("family", "hook", "remove"), HOOKS, ids=[f"{f}-{h}" for f, h, _ in HOOKS])
def test_removing_a_family_hook_breaks_the_equivalence(
    family, hook, remove, tokenizer, monkeypatch
):
    source = tiny_family(family, tokenizer)
    looped = convert_from_source(source, **SPLIT, recurrence=1)
    assert r1_diff(looped, source, tokenizer) <= 1e-5
    args = (looped, source, monkeypatch) if remove is _no_softcap else (looped, source)
    remove(*args)
    assert r1_diff(looped, source, tokenizer) > 1e-3, hook


def test_soft_capped_attention_falls_back_to_eager_after_loading(tokenizer, tmp_path):
    """Gemma-2's soft-capped attention has no sdpa kernel; the looped model loads with sdpa by
    default, so its layers must run eager (as the source does): sdpa refuses the soft-cap."""
    source = tiny_family("gemma2", tokenizer)
    convert_from_source(source, **SPLIT, recurrence=1).save_pretrained(tmp_path / "m")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert loaded.config._attn_implementation == "sdpa"
    assert r1_diff(loaded, source, tokenizer) <= 1e-5
    family = loaded.model.family
    loaded.model.family = type(family)(
        **{**family.__dict__, "attn_implementations": frozenset({"eager", "sdpa"})}
    )
    with pytest.raises(ValueError, match="softcap"):
        r1_diff(loaded, source, tokenizer)


# --------------------------------------------------------------------------- refused families


@pytest.mark.parametrize(
    ("model_type", "overrides", "missing"),
    [
        ("qwen3_moe", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32),
         "mixture-of-experts"),
        ("mixtral", dict(num_local_experts=4), "mixture-of-experts"),
        ("granite", dict(embedding_multiplier=12.0), "embedding_multiplier"),
        ("gemma3_text", dict(use_bidirectional_attention=True, num_key_value_heads=1, head_dim=16),
         "bidirectional attention"),
        ("gpt2", dict(), "no rms_norm_eps (the final norm is not an RMSNorm)"),
        ("gemma3", dict(), "a multimodal model; convert its text decoder (model_type 'gemma3_text'"),
    ],
)  # fmt: skip
def test_an_unsupported_family_is_one_line_naming_type_missing_and_tested(
    model_type, overrides, missing, tokenizer
):
    small = dict(vocab_size=64, hidden_size=32, num_attention_heads=2, num_hidden_layers=2)
    if model_type == "gpt2":
        small = dict(vocab_size=64, n_embd=32, n_head=2, n_layer=2)
    if model_type == "gemma3":
        small = dict(
            text_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                             num_key_value_heads=1, head_dim=16, intermediate_size=32,
                             vocab_size=300),
            vision_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=32, image_size=28, patch_size=14),
            mm_tokens_per_image=4,
        )  # fmt: skip
    config = AutoConfig.for_model(model_type, **{**small, **overrides})
    source = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)](config)
    with pytest.raises(ModelError) as err:
        convert_from_source(source, prelude=[0], block=[1], coda=[])
    msg = str(err.value)
    assert "\n" not in msg and model_type in msg and missing in msg and "qwen3" in msg


# --------------------------------------------------------------------------- the tiny profile


def test_the_tiny_profile_builds_and_converts_every_tested_family(tokenizer):
    """`prepare.model.tiny.architecture` takes every tested family (and only those), and what
    `build_tiny_model` builds passes the source check and converts exactly."""
    from typing import get_args

    from retroloop.config import TinyModelSpec
    from retroloop.models.loading import build_tiny_model, check_supported

    annotation = TinyModelSpec.model_fields["architecture"].annotation
    assert set(get_args(annotation)) == set(TESTED_FAMILIES)
    for family in TESTED_FAMILIES:
        spec = TinyModelSpec(architecture=family, hidden_size=32, num_hidden_layers=6,
                             num_attention_heads=2, num_key_value_heads=1, intermediate_size=64)  # fmt: skip
        source = build_tiny_model(spec, tokenizer)
        assert source.config.model_type == family
        check_supported(source)
        looped = convert_from_source(source, **SPLIT, recurrence=1)
        assert r1_diff(looped, source, tokenizer) <= 1e-5, family
    gpt2 = AutoConfig.for_model("gpt2", vocab_size=64, n_embd=32, n_head=2, n_layer=2)
    with pytest.raises(ModelError, match="'gpt2' cannot be looped: .*; tested families: llama"):
        check_supported(MODEL_FOR_CAUSAL_LM_MAPPING[type(gpt2)](gpt2))


def test_an_attention_type_the_loop_cannot_honour_is_refused_after_the_family_was_seen(tokenizer):
    """The config's own options are checked on every conversion, not only the first of a family
    (whose classes are looked up once): a layer type other than full / sliding window (e.g.
    Llama-4's chunked attention) is one line, even after a plain Qwen2 converted."""
    convert_from_source(tiny_family("qwen2", tokenizer), **SPLIT)
    source = tiny_family("qwen2", tokenizer)
    source.config.layer_types = ["full_attention", "chunked_attention"] * 3
    with pytest.raises(ModelError, match="'qwen2' cannot be looped: attention type 'chunked_"):
        convert_from_source(source, **SPLIT)
