"""retroloop.eval: IFEval grading, GSM8K answers, cached generation, NLL and the exact reverse KL on samples."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from retroloop.datasets import CHAT_SCHEMA, builtin_dataset
from retroloop.errors import DataError
from retroloop.eval import gsm8k, ifeval
from retroloop.eval.generation import generate_responses
from retroloop.eval.likelihood import nll_per_token, reverse_kl_exact_on_samples

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
IFEVAL = SHARED_DATA / "ifeval" / "input_data.jsonl"
GSM8K = SHARED_DATA / "gsm8k" / "test.jsonl"
needs_ifeval = pytest.mark.skipif(not IFEVAL.is_file(), reason=f"real IFEval data not at {IFEVAL}")
needs_gsm8k = pytest.mark.skipif(not GSM8K.is_file(), reason=f"real GSM8K data not at {GSM8K}")

# --------------------------------------------------------------------------- IFEval


def test_offline_instructions_are_the_registry_minus_nltk_ones():
    registered = set(ifeval.registry().INSTRUCTION_DICT)
    assert len(registered) == 25
    assert ifeval.OFFLINE_INSTRUCTIONS == registered - ifeval.NLTK_DATA_INSTRUCTIONS
    assert len(ifeval.SYNTHETIC_INSTRUCTIONS) == 22


@needs_ifeval
def test_ifeval_loader_reads_the_real_file():
    df = ifeval.load_ifeval(IFEVAL)
    assert len(df) == 540 and df.schema == CHAT_SCHEMA
    ids = {i for row in df["instruction_id_list"] for i in row}
    assert ids <= ifeval.OFFLINE_INSTRUCTIONS | ifeval.NLTK_DATA_INSTRUCTIONS
    first = df.filter(df["id"] == "1000").row(0, named=True)
    assert first["instruction_id_list"][1] == "detectable_format:number_highlighted_sections"
    assert json.loads(first["kwargs"])[1] == {"num_highlights": 3}


@needs_ifeval
def test_every_real_ifeval_record_grades_without_error():
    df = ifeval.load_ifeval(IFEVAL)
    scores = [
        ifeval.score_response(r["prompt"], "A plain reply.", r["instruction_id_list"], r["kwargs"])
        for r in df.iter_rows(named=True)
    ]
    agg = ifeval.aggregate(scores)
    skipped = {i for s in scores for i in s["skipped"]}
    assert skipped <= ifeval.NLTK_DATA_INSTRUCTIONS
    assert agg["instructions"] + agg["skipped_instructions"] == sum(
        len(r) for r in df["instruction_id_list"]
    )


CASES = [
    # (instruction id, kwargs, compliant response, non-compliant response)
    ("punctuation:no_comma", {}, "No commas here at all.", "Well, there is one."),
    ("detectable_format:title", {}, "<<Ode to Joy>>\nA poem.", "Ode to Joy\nA poem."),
    (
        "startend:end_checker",
        {"end_phrase": "Any other questions?"},
        "Done. Any other questions?",
        "Any other questions? Done.",
    ),
    (
        "keywords:existence",
        {"keywords": ["moon", "tide"]},
        "The moon pulls the tide.",
        "The sun shines.",
    ),
    (
        "detectable_format:number_bullet_lists",
        {"num_bullets": 2},
        "* one\n* two",
        "* one\n* two\n* three",
    ),
    (
        "length_constraints:number_words",
        {"num_words": 5, "relation": "less than"},
        "Four words right here.",
        "This reply has far more than five words.",
    ),
    (
        "change_case:english_lowercase",
        {},
        "this is an english sentence written in lowercase letters only.",
        "This Is Not Lowercase At All, Sadly.",
    ),
    ("detectable_format:json_format", {}, '```json\n{"a": 1}\n```', "a: 1"),
]


@pytest.mark.parametrize(("iid", "kwargs", "good", "bad"), CASES, ids=[c[0] for c in CASES])
def test_checkers_grade_compliant_true_and_non_compliant_false(iid, kwargs, good, bad):
    ok = ifeval.score_response("prompt", good, [iid], [kwargs])
    ko = ifeval.score_response("prompt", bad, [iid], [kwargs])
    assert ok["strict"] == [True] and ok["loose"] == [True] and ok["graded"] == [iid]
    assert ko["strict"] == [False]


def test_loose_forgives_a_preamble_and_asterisks():
    quoted = ifeval.score_response(
        "p", 'Sure, here it is:\n"all quoted"', ["startend:quotation"], [{}]
    )
    assert quoted == {
        "strict": [False],
        "loose": [True],
        "graded": ["startend:quotation"],
        "skipped": [],
    }
    ended = ifeval.score_response(
        "p", "Bye. **Is there anything else I can help with?**", ["startend:end_checker"],
        [{"end_phrase": "Is there anything else I can help with?"}],
    )  # fmt: skip
    assert ended["strict"] == [False] and ended["loose"] == [True]


def test_empty_response_fails_even_an_absence_check():
    out = ifeval.score_response("p", "   ", ["punctuation:no_comma"], [{}])
    assert out["strict"] == [False] and out["loose"] == [False]


def test_nltk_checkers_are_skipped_and_counted_when_data_is_missing(monkeypatch):
    monkeypatch.setattr(ifeval, "nltk_data_available", lambda iid: False)
    ids = ["length_constraints:number_sentences", "punctuation:no_comma"]
    kwargs = json.dumps(
        [{"num_sentences": 2, "relation": "less than"}, {}]
    )  # the frame's JSON form
    out = ifeval.score_response("p", "One sentence.", ids, kwargs)
    assert out == {
        "strict": [True],
        "loose": [True],
        "graded": ["punctuation:no_comma"],
        "skipped": [ids[0]],
    }
    assert ifeval.aggregate([out])["skipped_instructions"] == 1


def test_kwargs_nulls_dropped_missing_and_unknown_rejected():
    out = ifeval.score_response(
        "p", "* a\n* b", ["detectable_format:number_bullet_lists"], [{"num_bullets": 2, "x": None}]
    )
    assert out["strict"] == [True]
    with pytest.raises(DataError, match="lacks kwargs.*num_bullets"):
        ifeval.score_response(
            "p", "* a", ["detectable_format:number_bullet_lists"], [{"num_bullets": None}]
        )
    with pytest.raises(DataError, match="unknown IFEval instruction id"):
        ifeval.score_response("p", "a", ["made:up"], [{}])


def test_aggregate_on_a_hand_example():
    scores = [
        {"strict": [True, False], "loose": [True, True], "skipped": []},
        {"strict": [True], "loose": [True], "skipped": ["change_case:capital_word_frequency"]},
        {
            "strict": [],
            "loose": [],
            "skipped": ["length_constraints:number_sentences"],
        },  # no graded
    ]
    agg = ifeval.aggregate(scores)
    assert agg["prompt_strict"] == 0.5 and agg["prompt_loose"] == 1.0
    assert agg["inst_strict"] == pytest.approx(2 / 3) and agg["inst_loose"] == 1.0
    assert (agg["prompts"], agg["instructions"], agg["skipped_instructions"]) == (2, 3, 2)


def test_synthetic_prompts_are_all_gradable_offline():
    df = builtin_dataset("ifeval_synthetic", max_records=120, seed=0)
    used = {i for row in df["instruction_id_list"] for i in row}
    assert used <= ifeval.SYNTHETIC_INSTRUCTIONS and len(used) >= 15
    for row in df.iter_rows(named=True):
        out = ifeval.score_response(
            row["prompt"], "A reply.", row["instruction_id_list"], row["kwargs"]
        )
        assert out["skipped"] == [] and len(out["strict"]) == len(row["instruction_id_list"])
        for iid, kwargs in zip(row["instruction_id_list"], json.loads(row["kwargs"]), strict=True):
            assert ifeval.describe(iid, kwargs) in row["prompt"]


# --------------------------------------------------------------------------- GSM8K


@needs_gsm8k
def test_gsm8k_loader_and_gold_answers():
    df = gsm8k.load_gsm8k(GSM8K)
    assert len(df) == 1319 and df.schema == CHAT_SCHEMA
    for text, answer in zip(df["response"], df["answer"], strict=True):
        after = text.rsplit("####", 1)[1].strip().replace(",", "")
        assert gsm8k.extract_answer(text) == after == answer
        assert gsm8k.is_correct(text, answer)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("So she pays $1,250.", "1250"),
        ("It is 3 then 4 and finally 18.00.", "18.00"),
        ("#### -7", "-7"),
        ("first 12 #### 5 and 6", "5"),
        ("no numbers here", None),
    ],
)
def test_extract_answer(text, expected):
    assert gsm8k.extract_answer(text) == expected


def test_is_correct_compares_values():
    assert gsm8k.is_correct("The answer is 18.00", "18")
    assert gsm8k.is_correct("#### 1,000", "1000")
    assert not gsm8k.is_correct("The answer is 17", "18")
    assert not gsm8k.is_correct("I do not know", "18")


# --------------------------------------------------------------------------- tiny model


@pytest.fixture(scope="module")
def tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    from retroloop.models.loading import build_tiny_tokenizer

    corpus = [
        "The quick brown fox jumps over the lazy dog.",
        "Write a short note about the moon and the tides.",
        "Python is a programming language with clear syntax.",
    ] * 10
    tok = build_tiny_tokenizer(corpus, vocab_size=300)
    config = LlamaConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=64,
        vocab_size=len(tok),
        max_position_embeddings=256,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    torch.manual_seed(1)
    other = LlamaForCausalLM(config).eval()
    return model, other, tok


PROMPTS = ["Write a note.", "Hi", "Python is a programming language. Tell me more about it."]


def test_generation_is_cached_and_batch_independent(tiny, tmp_path):
    model, _, tok = tiny
    calls = []
    real_generate = model.generate

    def counting_generate(*args, **kwargs):
        calls.append(kwargs["input_ids"].shape)
        return real_generate(*args, **kwargs)

    model.generate = counting_generate
    try:
        kw = dict(max_new_tokens=6, cache_dir=tmp_path, cache_key_parts={"model": "tiny-a"})
        first = generate_responses(model, tok, PROMPTS, batch_size=2, **kw)
        assert len(calls) == 2 and len(first) == 3
        assert generate_responses(model, tok, PROMPTS, batch_size=2, **kw) == first
        assert len(calls) == 2  # served from the cache
        assert len(list(tmp_path.glob("gen-*.json"))) == 1
        kw["cache_key_parts"] = {"model": "tiny-b"}
        unbatched = generate_responses(model, tok, PROMPTS, batch_size=1, **kw)
        assert len(calls) == 5  # another key: generated again, one prompt per call
        assert unbatched == first  # left padding does not change greedy outputs
        assert calls[0][0] == 2 and calls[2][0] == 1
    finally:
        del model.generate


def test_nll_matches_hand_computed_cross_entropy(tiny):
    model, _, tok = tiny
    texts = ["The quick brown fox.", "Python is a programming language with clear syntax.", "moon"]
    total, count = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor(tok(text)["input_ids"])
            if len(ids) < 2:
                continue
            logits = model(input_ids=ids[None]).logits[0]
            total += F.cross_entropy(logits[:-1], ids[1:], reduction="sum").item()
            count += len(ids) - 1
    got = nll_per_token(model, tok, texts, max_seq_len=64, batch_size=2)
    assert got == pytest.approx(total / count, abs=1e-5)
    assert math.log(len(tok)) * 0.8 < got < math.log(len(tok)) * 1.2  # random init ~ uniform


def test_reverse_kl_exact_on_samples_of_a_model_against_itself_is_zero(tiny):
    model, other, tok = tiny
    kw = dict(max_new_tokens=6, batch_size=2, seed=0)
    assert abs(reverse_kl_exact_on_samples(model, model, tok, PROMPTS, **kw)) <= 1e-6
    a = reverse_kl_exact_on_samples(model, other, tok, PROMPTS, **kw)
    b = reverse_kl_exact_on_samples(model, other, tok, PROMPTS, **kw)
    assert a == b > 0  # seeded sampling: reproducible; different weights: positive


DOCS = [
    "The quick brown fox jumps over the lazy dog.",
    "Python is a programming language with clear syntax.",
    "Write a short note about the moon and the tides, and the moon again.",
]


def test_one_forward_gives_nll_per_tokens_nll_to_the_bit(tiny):
    """evaluate reads the domain NLL off the forward that scores the KL (and the teacher's off
    `held_out`'s): it must be `nll_per_token`'s number exactly, or metrics.json would move."""
    from retroloop.eval.scaling import held_out, nll_and_kl

    model, other, tok = tiny
    kw = dict(max_seq_len=16, batch_size=2)  # 2 + 1 documents: a ragged last batch, padding
    reference = held_out(model, tok, DOCS, **kw)
    assert reference.teacher_nll == nll_per_token(model, tok, DOCS, **kw)
    assert nll_and_kl(other, reference, use_cache=False)["nll"] == nll_per_token(
        other, tok, DOCS, **kw
    )


def test_recurrence_scaling_takes_a_known_row_and_computes_the_others(tiny, monkeypatch):
    from retroloop.eval import suite
    from retroloop.eval.scaling import held_out

    model, other, tok = tiny
    data = suite.EvalData([], [], DOCS[:2], DOCS, max_seq_len=16)
    reference = held_out(model, tok, DOCS, max_seq_len=16, batch_size=2)
    monkeypatch.setattr(suite, "flops_per_token", lambda m, R=None: 1e9 * R)  # a plain model
    forwards = []
    real = other.forward
    monkeypatch.setattr(other, "forward", lambda *a, **k: forwards.append(1) or real(*a, **k))
    known = {
        2: {"domain_nll": 1.5, "domain_ppl": 4.5, "instruct_nll": 2.5, "domain_forward_kl": 0.5}
    }
    rows = suite.recurrence_scaling(other, tok, data, [1, 2], batch_size=2, reference=reference,
                                    known=known)  # fmt: skip
    assert rows[1] == {"R": 2, **known[2], "gflops_per_token": 2.0}
    assert len(forwards) == 2 + 1  # R = 1 only: domain (2 batches, NLL and KL at once), instruct
    assert list(rows[0]) == list(rows[1])  # one column order for the CSV
    assert rows[0]["domain_nll"] == nll_per_token(other, tok, DOCS, max_seq_len=16, batch_size=2)
    assert rows[0]["domain_forward_kl"] > 0
