"""The rollout engine's fast path: the merged-LoRA sampler agrees with the unmerged learner and
leaves the model as it was, the inverse-CDF draw samples the given distribution, a row's tokens
do not depend on its batch-mates, and the roomy KV cache layer equals a concatenating one."""

from __future__ import annotations

import pytest
import torch
from transformers.cache_utils import DynamicLayer

from retroloop.config import TinyModelSpec
from retroloop.models.loading import build_tiny_model, build_tiny_tokenizer
from retroloop.rollout import (
    TransformersEngine,
    _draw,
    _MergedLinear,
    _RoomyLayer,
    row_seed,
    sampling_linears,
    token_logprobs,
)

PROMPTS = ["hi", "write a short poem about the sea and the sky", "count to three"]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def peft_student():
    from peft import LoraConfig, get_peft_model

    corpus = [f"the quick brown fox {i} jumps over the lazy dog; write a poem" for i in range(64)]
    tok = build_tiny_tokenizer(corpus, 256)
    spec = TinyModelSpec(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, vocab_size=256)  # fmt: skip
    base = build_tiny_model(spec, tok).requires_grad_(False)
    torch.manual_seed(0)
    student = get_peft_model(base, LoraConfig(r=4, lora_alpha=16, target_modules="all-linear"))
    with torch.no_grad():  # B = 0 at init: a LoRA that changes the outputs
        for name, q in student.named_parameters():
            if "lora_B" in name:
                q.normal_(0.0, 0.3)
    return student.eval(), tok


def test_merged_lora_sampler_matches_the_unmerged_learner_and_restores_the_model(peft_student):
    student, tok = peft_student
    before = {k: v.clone() for k, v in student.state_dict().items()}
    modules = dict(student.named_modules())
    with sampling_linears(student, {}):
        twins = [m for m in student.modules() if isinstance(m, _MergedLinear)]
        assert len(twins) == 2 * 7 + 1  # every LoRA linear of both layers, and the head
    assert dict(student.named_modules()) == modules
    assert all(torch.equal(v, before[k]) for k, v in student.state_dict().items())

    batch = TransformersEngine(student, tok, batch_size=4).sample(
        PROMPTS, n=2, max_new_tokens=8, seed=[3, 4, 5]
    )
    pk = batch.pack(tok.pad_token_id)
    with torch.no_grad():  # the learner: PEFT's W·x + s·B·(A·x), no cache
        logits = student(input_ids=pk.tokens_B_T, attention_mask=pk.attention_mask_B_T).logits
    learner = token_logprobs(logits, pk.tokens_B_T)[pk.mask_B_T]
    lora_effect = (learner - _unadapted_logprobs(student, pk)).abs().max()
    assert lora_effect > 0.05, "the LoRA must matter for this test to check its merge"
    torch.testing.assert_close(pk.sampler_logp_B_T[pk.mask_B_T], learner, atol=1e-4, rtol=0)


def _unadapted_logprobs(student, pk) -> torch.Tensor:
    with torch.no_grad(), student.disable_adapter():
        logits = student(input_ids=pk.tokens_B_T, attention_mask=pk.attention_mask_B_T).logits
    return token_logprobs(logits, pk.tokens_B_T)[pk.mask_B_T]


def test_a_rows_tokens_do_not_depend_on_its_batch_mates(peft_student):
    student, tok = peft_student
    engine = TransformersEngine(student, tok, batch_size=6)
    together = engine.sample(PROMPTS, n=2, max_new_tokens=8, seed=[3, 4, 5])
    alone = TransformersEngine(student, tok, batch_size=1).sample(
        PROMPTS[1:2], n=2, max_new_tokens=8, seed=[4]
    )
    assert together.completion_ids[2:4] == alone.completion_ids
    again = engine.sample(PROMPTS, n=2, max_new_tokens=8, seed=[3, 4, 5])
    assert again.completion_ids == together.completion_ids
    assert again.sampler_logprobs == together.sampler_logprobs


def test_inverse_cdf_draw_samples_the_distribution_and_never_a_zero():
    p = torch.tensor([0.5, 0.3, 0.2, 0.0], dtype=torch.float32)
    n = 20000
    drawn = _draw(p.expand(n, 4), torch.Generator().manual_seed(0))
    freq = torch.bincount(drawn, minlength=4).double() / n
    assert freq[3] == 0
    sigma = (p.double() * (1 - p.double()) / n).sqrt()
    assert ((freq - p.double()).abs() <= 4 * sigma + 1e-12).all(), freq
    # per-row generators: row 1's token is its own generator's, whatever row 0 holds
    gens = lambda: [torch.Generator().manual_seed(row_seed(s, 0)) for s in (1, 2)]  # noqa: E731
    pair = torch.stack([torch.tensor([0.0, 0.0, 0.0, 1.0]), p])
    a, b = _draw(pair, gens()), _draw(torch.stack([p, p]), gens())
    assert a[0] == 3 and a[1] == b[1]


def test_roomy_layer_equals_a_concatenating_layer_through_updates_and_a_crop():
    torch.manual_seed(0)
    k0, v0 = torch.randn(2, 1, 3, 4), torch.randn(2, 1, 3, 4)
    plain, src = DynamicLayer(), DynamicLayer()
    plain.update(k0[[0, 0, 1]], v0[[0, 0, 1]])
    src.update(k0, v0)
    roomy = _RoomyLayer(src, torch.tensor([0, 0, 1]), extra=3)
    steps = [torch.randn(3, 1, 1, 4) for _ in range(4)]
    for i, kv in enumerate(steps):  # 4 updates into room for 3: the last one grows by cat
        for layer in (plain, roomy):
            layer.update(kv, -kv)
            if i == 1:
                layer.crop(-1)
        assert torch.equal(plain.keys, roomy.keys) and torch.equal(plain.values, roomy.values)
    assert roomy.get_seq_length() == plain.get_seq_length() == 6
