"""The looped model: exact equivalence at R = 1, KV cache, save/load, truncated BPTT, R sampling, errors."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from retroloop.errors import ConfigError, ModelError
from retroloop.models.recurrent import (
    CACHE_KWARG,
    RecurrentConfig,
    RecurrentForCausalLM,
    adapter_weight,
    convert_from_source,
    drop_layers,
    equivalence_max_abs_diff,
    pass_through_weight,
    recurrence_mean_at,
    repeat_block_weight,
    sample_recurrence,
)

HIDDEN = 64
TINY = dict(
    vocab_size=256,
    hidden_size=HIDDEN,
    intermediate_size=128,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    tie_word_embeddings=True,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    # Larger than the default 0.02 so logits are peaked and greedy tokens vary: a broken
    # cache then changes the generated tokens instead of hiding behind near-uniform logits.
    initializer_range=0.2,
)


def tiny_source(arch: str = "llama", seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(**{**TINY, **overrides})).eval()
    return Qwen2ForCausalLM(Qwen2Config(**{**TINY, **overrides})).eval()


def batch(seed: int = 1, left_pad: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Two sequences of 8 tokens, the first left-padded by `left_pad`."""
    g = torch.Generator().manual_seed(seed)
    ids_B_T = torch.randint(3, 256, (2, 8), generator=g)
    mask_B_T = torch.ones_like(ids_B_T)
    ids_B_T[0, :left_pad] = 0
    mask_B_T[0, :left_pad] = 0
    return ids_B_T, mask_B_T


def make_iterations_matter(model: RecurrentForCausalLM, seed: int = 2) -> None:
    """Replace the pass-through adapter (under which every iteration computes block(e)) by a mix."""
    g = torch.Generator().manual_seed(seed)
    eye = torch.eye(HIDDEN)
    with torch.no_grad():
        model.model.adapter.weight.copy_(
            torch.cat([0.5 * eye, 0.5 * eye], 1)
            + 0.05 * torch.randn(HIDDEN, 2 * HIDDEN, generator=g)
        )


def logits(model, ids_B_T, mask_B_T, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids_B_T, attention_mask=mask_B_T, use_cache=False, **kw).logits


# --------------------------------------------------------------------------- equivalence


@pytest.mark.parametrize("init", ["pass_input", "repeat_block"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_full_split_at_r1_equals_source(arch, init):
    source = tiny_source(arch)
    looped = convert_from_source(
        source, prelude=[0, 1], block=[2, 3], coda=[4, 5], recurrence=1, adapter_init=init
    )
    ids_B_T, mask_B_T = batch()
    keep_B_T = mask_B_T.bool()
    got_B_T_V = logits(looped, ids_B_T, mask_B_T)
    want_B_T_V = logits(source, ids_B_T, mask_B_T)
    assert (got_B_T_V - want_B_T_V).abs()[keep_B_T].max() <= 1e-5


@pytest.mark.parametrize("init", ["pass_input", "repeat_block"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_dropped_layers_at_r1_equal_drop_layers(arch, init):
    source = tiny_source(arch)
    prelude, block, coda = [0], [2, 3], [5]
    looped = convert_from_source(
        source, prelude=prelude, block=block, coda=coda, recurrence=4, adapter_init=init
    )
    reference = drop_layers(source, prelude + block + coda)
    ids_B_T, mask_B_T = batch()
    assert equivalence_max_abs_diff(looped, reference, ids_B_T, mask_B_T) <= 1e-5
    # ... and the check can fail: the full source differs from the layer-dropped model.
    assert equivalence_max_abs_diff(looped, source, ids_B_T, mask_B_T) > 1e-3
    assert len(reference.model.layers) == reference.config.num_hidden_layers == 4
    assert len(source.model.layers) == 6  # the source is untouched


def repeated_layers(source, prelude: list[int], block: list[int], coda: list[int], k: int):
    """A plain source model whose decoder runs prelude, the block's layers k times, then coda."""
    model = drop_layers(source, prelude + block + coda)
    layers = list(model.model.layers)
    P, B = len(prelude), len(block)
    order = list(range(P)) + list(range(P, P + B)) * k + list(range(P + B, len(layers)))
    model.model.layers = torch.nn.ModuleList(layers[i] for i in order)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in order]
    model.config.num_hidden_layers = len(order)
    return model


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_repeat_block_at_r_k_equals_the_block_layers_repeated_k_times(arch, k):
    source = tiny_source(arch)
    prelude, block, coda = [0], [2, 3], [5]
    looped = convert_from_source(
        source, prelude=prelude, block=block, coda=coda, adapter_init="repeat_block"
    )
    ids_B_T, mask_B_T = batch()
    keep_B_T = mask_B_T.bool()
    got_B_T_V = logits(looped, ids_B_T, mask_B_T, num_recurrence=k)
    want_B_T_V = logits(repeated_layers(source, prelude, block, coda, k), ids_B_T, mask_B_T)
    assert (got_B_T_V - want_B_T_V).abs()[keep_B_T].max() <= 1e-5
    if k > 1:  # the check can fail: pass-input at R = k is the block applied once
        inert = convert_from_source(source, prelude=prelude, block=block, coda=coda)
        other_B_T_V = logits(inert, ids_B_T, mask_B_T, num_recurrence=k)
        assert (other_B_T_V - want_B_T_V).abs()[keep_B_T].max() > 1e-3


def test_pass_input_ignores_r_before_training_and_repeat_block_does_not():
    source = tiny_source()
    ids_B_T, mask_B_T = batch()
    outputs = {}
    for init in ("pass_input", "repeat_block"):
        looped = convert_from_source(source, prelude=[0], block=[2, 3], coda=[5], adapter_init=init)
        outputs[init] = [logits(looped, ids_B_T, mask_B_T, num_recurrence=r) for r in (1, 2, 4)]
    assert all(torch.equal(outputs["pass_input"][0], o) for o in outputs["pass_input"][1:])
    assert all(
        (outputs["repeat_block"][0] - o).abs().max() > 1e-3 for o in outputs["repeat_block"][1:]
    )


def test_adapter_init_weights_and_unknown_init_is_one_line_config_error():
    assert torch.equal(adapter_weight("pass_input", 3), pass_through_weight(3))
    eye, zeros = torch.eye(3), torch.zeros(3, 3)
    assert torch.equal(repeat_block_weight(3), torch.cat([eye, zeros], 1))
    with pytest.raises(ConfigError, match=r"^convert\.init: unknown adapter init 'zero'") as err:
        convert_from_source(tiny_source(), prelude=[0], block=[1], coda=[5], adapter_init="zero")
    assert "\n" not in str(err.value)


def test_repeat_block_init_survives_save_and_load(tmp_path):
    looped = convert_from_source(
        tiny_source(), prelude=[0], block=[1, 2], coda=[5], adapter_init="repeat_block"
    )
    looped.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.adapter_init == "repeat_block"
    assert torch.equal(loaded.model.adapter.weight, repeat_block_weight(HIDDEN))
    ids_B_T, mask_B_T = batch()
    torch.testing.assert_close(
        logits(loaded, ids_B_T, mask_B_T, num_recurrence=3),
        logits(looped, ids_B_T, mask_B_T, num_recurrence=3),
        rtol=0,
        atol=0,
    )


def test_conversion_copies_weights_ties_head_and_passes_e_through():
    source = tiny_source()
    looped = convert_from_source(
        source, prelude=[0], block=[1, 2], coda=[5], source_path="src", source_sha256="abc"
    )
    assert torch.equal(looped.model.adapter.weight, pass_through_weight(HIDDEN))
    assert looped.model.adapter.bias is None
    assert looped.lm_head.weight is looped.model.embed_tokens.weight
    assert torch.equal(
        looped.model.block[1].mlp.up_proj.weight, source.model.layers[2].mlp.up_proj.weight
    )
    with torch.no_grad():
        looped.model.block[1].mlp.up_proj.weight.add_(1.0)
    assert not torch.equal(
        looped.model.block[1].mlp.up_proj.weight, source.model.layers[2].mlp.up_proj.weight
    )
    cfg = looped.config
    assert (cfg.prelude_layers, cfg.block_layers, cfg.coda_layers) == ([0], [1, 2], [5])
    assert (cfg.source_model, cfg.source_sha256, cfg.source_model_type) == ("src", "abc", "llama")
    assert cfg.num_hidden_layers == 4 and cfg.vocab_size == 256


def test_a_fresh_config_builds_a_pass_through_adapter():
    source_config = LlamaConfig(**TINY).to_dict()
    model = RecurrentForCausalLM(
        RecurrentConfig(
            source_config=source_config, prelude_layers=[0], block_layers=[1], coda_layers=[2]
        )
    )
    assert torch.equal(model.model.adapter.weight, pass_through_weight(HIDDEN))


# --------------------------------------------------------------------------- KV cache and generation


@pytest.mark.parametrize("recurrence", [1, 3])
def test_greedy_generate_with_cache_equals_without(recurrence):
    looped = convert_from_source(
        tiny_source(),
        prelude=[0],
        block=[2, 3],
        coda=[5],
        recurrence=recurrence,
        state_init_std=0.0,
    )
    make_iterations_matter(looped)
    ids_B_T, mask_B_T = batch(left_pad=3)
    kw = dict(
        input_ids=ids_B_T,
        attention_mask=mask_B_T,
        max_new_tokens=6,
        do_sample=False,
        output_scores=True,
        return_dict_in_generate=True,
    )
    cached = looped.generate(**kw)
    uncached = looped.generate(**kw, use_cache=False)
    assert torch.equal(cached.sequences, uncached.sequences)
    assert (
        max((a - b).abs().max().item() for a, b in zip(cached.scores, uncached.scores, strict=True))
        < 1e-4
    )
    # The left-padded row generates what it generates alone, unpadded.
    alone = looped.generate(input_ids=ids_B_T[:1, 3:], max_new_tokens=6, do_sample=False)
    assert torch.equal(alone[0, 5:], cached.sequences[0, 8:])


def test_cache_holds_one_entry_per_iteration_and_layer():
    looped = convert_from_source(
        tiny_source(), prelude=[0], block=[2, 3], coda=[5], state_init_std=0.0
    )
    ids_B_T, mask_B_T = batch(left_pad=0)
    with torch.no_grad():
        out = looped(input_ids=ids_B_T, attention_mask=mask_B_T, use_cache=True, num_recurrence=3)
    cache = out[CACHE_KWARG]
    assert len(cache.layers) == 1 + 1 + 3 * 2
    assert {layer.get_seq_length() for layer in cache.layers} == {8}
    assert cache.retroloop_recurrence == 3
    # Any other R is refused, a smaller one too (its coda would read slots of two depths), and
    # the refusal leaves the cache as it was.
    for other in (4, 2, 1):
        with pytest.raises(ConfigError, match=f"filled at R = 3 .* at R = {other}"):
            looped(input_ids=ids_B_T[:, :1], cache=cache, use_cache=True, num_recurrence=other)
        assert {layer.get_seq_length() for layer in cache.layers} == {8}
    # A cache without the record (e.g. rebuilt by hand) is judged by the slots that hold tokens.
    del cache.retroloop_recurrence
    with pytest.raises(ConfigError, match="filled at R = 3"):
        looped(input_ids=ids_B_T[:, :1], cache=cache, use_cache=True, num_recurrence=2)
    with torch.no_grad():  # the same R goes on
        looped(input_ids=ids_B_T[:, :1], cache=cache, use_cache=True, num_recurrence=3)
    assert {layer.get_seq_length() for layer in cache.layers} == {9}


def test_layers_keep_their_source_index_after_a_call():
    looped = convert_from_source(
        tiny_source(), prelude=[0], block=[2, 3], coda=[5], state_init_std=0.0
    )
    ids_B_T, mask_B_T = batch(left_pad=0)
    with torch.no_grad():
        looped(input_ids=ids_B_T, attention_mask=mask_B_T, use_cache=True, num_recurrence=3)
    m = looped.model
    got = [layer.self_attn.layer_idx for layer in [*m.prelude, *m.block, *m.coda]]
    assert got == [0, 2, 3, 5]


def test_recurrence_changes_the_output_once_the_adapter_mixes_state():
    looped = convert_from_source(
        tiny_source(), prelude=[0], block=[2, 3], coda=[5], state_init_std=0.0
    )
    ids_B_T, mask_B_T = batch()
    r1, r3 = (logits(looped, ids_B_T, mask_B_T, num_recurrence=r) for r in (1, 3))
    assert torch.allclose(r1, r3, atol=1e-5)  # pass-through: every iteration computes block(e)
    make_iterations_matter(looped)
    r1, r3 = (logits(looped, ids_B_T, mask_B_T, num_recurrence=r) for r in (1, 3))
    assert not torch.allclose(r1, r3, atol=1e-3)


# --------------------------------------------------------------------------- save / load


def test_save_pretrained_round_trip_is_bit_exact(tmp_path):
    looped = convert_from_source(
        tiny_source("qwen2"), prelude=[0], block=[2, 3], coda=[5], recurrence=2
    )
    make_iterations_matter(looped)
    looped.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(loaded, RecurrentForCausalLM)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    ids_B_T, mask_B_T = batch()
    torch.manual_seed(7)  # same s_0 noise for both
    want = logits(looped, ids_B_T, mask_B_T)
    torch.manual_seed(7)
    got = logits(loaded, ids_B_T, mask_B_T)
    assert torch.equal(got, want)


# --------------------------------------------------------------------------- training


def _saved_tensor_count(model, ids_B_T, **kw) -> int:
    count = 0

    def pack(t):
        nonlocal count
        count += 1
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids_B_T, labels=ids_B_T, **kw)
    return count


def test_truncated_bptt_reaches_the_block_and_frees_early_iterations():
    looped = convert_from_source(tiny_source(), prelude=[0], block=[2, 3], coda=[5])
    make_iterations_matter(looped)
    looped.train()
    ids_B_T, _ = batch(left_pad=0)
    out = looped(input_ids=ids_B_T, labels=ids_B_T, num_recurrence=4, bptt_k=1)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    for name in ("block", "prelude", "coda"):
        grads = [p.grad for p in getattr(looped.model, name).parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads), name
    assert looped.model.adapter.weight.grad.abs().sum() > 0
    # Iterations before the last k keep no graph: R=4, k=1 saves what R=1 saves.
    k1 = _saved_tensor_count(looped, ids_B_T, num_recurrence=4, bptt_k=1)
    assert k1 == _saved_tensor_count(looped, ids_B_T, num_recurrence=1)
    assert k1 < _saved_tensor_count(looped, ids_B_T, num_recurrence=4)


# --------------------------------------------------------------------------- early exit


def test_early_exit_stops_when_successive_distributions_agree():
    looped = convert_from_source(
        tiny_source(), prelude=[0], block=[2, 3], coda=[5], recurrence=4, state_init_std=0.0
    )
    make_iterations_matter(looped)
    ids_B_T, mask_B_T = batch()
    r2, r4 = (logits(looped, ids_B_T, mask_B_T, num_recurrence=r) for r in (2, 4))
    looped.config.early_exit_kl = 1e9  # always converged: exits after the second iteration
    assert torch.allclose(logits(looped, ids_B_T, mask_B_T), r2, atol=1e-6)
    looped.config.early_exit_kl = 1e-30  # never converged: runs all R
    assert torch.allclose(logits(looped, ids_B_T, mask_B_T), r4, atol=1e-6)
    # With a cache, skipped iterations are filled so every slot keeps the same length.
    looped.config.early_exit_kl = 1e9
    with torch.no_grad():
        out = looped(input_ids=ids_B_T, attention_mask=mask_B_T, use_cache=True)
        step = looped(
            input_ids=ids_B_T[:, :1],
            attention_mask=torch.cat([mask_B_T, mask_B_T[:, :1]], 1),
            cache=out[CACHE_KWARG],
            use_cache=True,
        )
    assert {layer.get_seq_length() for layer in step[CACHE_KWARG].layers} == {9}


def test_early_exit_with_a_cache_gives_the_cache_free_values():
    """The values, not just the slot lengths: a prefill that exits after two of four iterations,
    then one decode step, gives the logits of a cache-free run over the whole sequence (which
    exits after two as well), so the probe's coda entries were cropped and the kept block
    entries are the ones computed; the skipped iterations' slots hold iteration 2's keys and
    values (s_{k+1} ≈ s_k). Fails when the crop or the fill is dropped or shifted."""
    looped = convert_from_source(
        tiny_source(), prelude=[0], block=[2, 3], coda=[5], recurrence=4, state_init_std=0.0
    )
    make_iterations_matter(looped)
    looped.eval()
    P, C, B = len(looped.model.prelude), len(looped.model.coda), len(looped.model.block)
    ids_B_T, mask_B_T = batch()
    next_B_1 = ids_B_T[:, -1:].flip(0)
    full_ids, full_mask = (
        torch.cat([ids_B_T, next_B_1], 1),
        torch.cat([mask_B_T, mask_B_T[:, -1:]], 1),
    )
    all_four = logits(looped, full_ids, full_mask)[:, -1]
    looped.config.early_exit_kl = 1e9  # converged after the second iteration, on every call
    reference = logits(looped, full_ids, full_mask)[:, -1]
    assert not torch.allclose(reference, all_four, atol=1e-3)  # exiting early changes the result
    with torch.no_grad():
        out = looped(input_ids=ids_B_T, attention_mask=mask_B_T, use_cache=True)
        cache = out[CACHE_KWARG]
        for j in range(B):  # iterations 3 and 4 (k = 2, 3) hold iteration 2's (k = 1) entries
            kept = cache.layers[P + C + 1 * B + j]
            for k in (2, 3):
                torch.testing.assert_close(cache.layers[P + C + k * B + j].keys, kept.keys)
                torch.testing.assert_close(cache.layers[P + C + k * B + j].values, kept.values)
        step = looped(input_ids=next_B_1, attention_mask=full_mask, cache=cache, use_cache=True)
    torch.testing.assert_close(step.logits[:, -1], reference, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- recurrence sampling


def test_sample_recurrence_mean_is_mu_plus_one_and_capped():
    g = torch.Generator().manual_seed(0)
    samples = [sample_recurrence(3.0, 0.5, g, max_recurrence=100) for _ in range(4000)]
    assert min(samples) >= 1
    assert abs(sum(samples) / len(samples) - 4.0) < 0.15
    capped = [sample_recurrence(3.0, 0.5, g, max_recurrence=2) for _ in range(200)]
    assert set(capped) <= {1, 2}
    a, b = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert [sample_recurrence(2.0, 0.5, a, 8) for _ in range(20)] == [
        sample_recurrence(2.0, 0.5, b, 8) for _ in range(20)
    ]


def test_recurrence_mean_ramps_linearly_then_stays():
    assert recurrence_mean_at(0, 100, 1.0, 3.0, 0.5) == 1.0
    assert recurrence_mean_at(25, 100, 1.0, 3.0, 0.5) == pytest.approx(2.0)
    assert recurrence_mean_at(50, 100, 1.0, 3.0, 0.5) == 3.0
    assert recurrence_mean_at(99, 100, 1.0, 3.0, 0.5) == 3.0
    assert recurrence_mean_at(0, 100, 1.0, 3.0, 0.0) == 3.0


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("split", "match"),
    [
        (dict(prelude=[0], block=[2, 6], coda=[]), "out of range"),
        (dict(prelude=[0, 1], block=[1, 2], coda=[5]), "overlap"),
        (dict(prelude=[3], block=[1, 2], coda=[5]), "out of order"),
        (dict(prelude=[0], block=[3, 2], coda=[5]), "strictly increasing"),
        (dict(prelude=[0], block=[], coda=[5]), "at least one layer"),
        (dict(prelude=[0], block=[1], coda=[5], recurrence=0), "recurrence"),
    ],
)
def test_bad_split_or_recurrence_raises_config_error(split, match):
    with pytest.raises(ConfigError, match=match):
        convert_from_source(tiny_source(), **split)


def test_non_llama_source_raises_model_error():
    gpt2 = GPT2LMHeadModel(
        GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=32)
    )
    with pytest.raises(ModelError, match="gpt2"):
        convert_from_source(gpt2, prelude=[0], block=[1], coda=[])


def test_sliding_window_qwen2_layers_are_looped_with_their_window():
    # Layers 2.. slide over 4 tokens of the 8 (Qwen2's max_window_layers), so the block and coda
    # need the sliding mask; a plain causal mask (what the looped model built before) differs.
    source = tiny_source("qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=2)
    assert source.config.layer_types[2:] == ["sliding_attention"] * 4
    looped = convert_from_source(source, prelude=[0], block=[2, 3], coda=[5], recurrence=1)
    reference = drop_layers(source, [0, 2, 3, 5])
    ids_B_T, mask_B_T = batch()
    assert equivalence_max_abs_diff(looped, reference, ids_B_T, mask_B_T) <= 1e-5
    looped.model.attention_types = {k: ["full_attention"] * len(v)
                                    for k, v in looped.model.attention_types.items()}  # fmt: skip
    assert equivalence_max_abs_diff(looped, reference, ids_B_T, mask_B_T) > 1e-3


def test_forward_rejects_zero_recurrence_or_bptt():
    looped = convert_from_source(tiny_source(), prelude=[0], block=[1], coda=[5])
    with pytest.raises(ConfigError, match="num_recurrence"):
        looped(input_ids=torch.tensor([[5, 6]]), num_recurrence=0)
    with pytest.raises(ConfigError, match="bptt_k"):
        looped(input_ids=torch.tensor([[5, 6]]), bptt_k=0)
