"""LM head at selected positions: same logits and gradients as the full forward, any model."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from test_recurrent import batch, make_iterations_matter, tiny_source

from retroloop.models.head import chunked_rows, final_hidden_states, logits_at, output_head
from retroloop.models.recurrent import RecurrentForCausalLM, convert_from_source


def _model(kind: str) -> torch.nn.Module:
    if kind in ("llama", "qwen2"):
        return tiny_source(kind)
    looped = convert_from_source(tiny_source("llama"), prelude=[0], block=[1, 2], coda=[3])
    make_iterations_matter(looped)
    return looped


def _with_lora(model: torch.nn.Module) -> torch.nn.Module:
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():  # B starts at zero; make the adapter change the output
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.1)
    return peft


def _select(mask_B_T: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    return (torch.rand(mask_B_T.shape, generator=g) < 0.5) & mask_B_T.bool()


@pytest.mark.parametrize("kind", ["llama", "qwen2", "looped"])
@pytest.mark.parametrize("lora", [False, True])
def test_logits_at_equals_the_full_forward_at_the_selected_positions(kind, lora) -> None:
    model = _model(kind)
    model = _with_lora(model) if lora else model
    ids_B_T, mask_B_T = batch()
    select_B_T = _select(mask_B_T)
    kw = {"num_recurrence": 3} if kind == "looped" else {}
    with torch.no_grad():
        full = model(input_ids=ids_B_T, attention_mask=mask_B_T, use_cache=False, **kw).logits
        rows = logits_at(model, select_B_T, ids_B_T, mask_B_T, **kw)
    assert rows.shape == (int(select_B_T.sum()), full.shape[-1])
    torch.testing.assert_close(rows, full[select_B_T], rtol=1e-5, atol=1e-5)


def test_gradients_through_the_selected_head_equal_those_of_the_full_logits() -> None:
    model = _with_lora(_model("looped")).train()
    ids_B_T, mask_B_T = batch()
    select_B_T = _select(mask_B_T)
    targets_N = ids_B_T[select_B_T]

    def grads(logits_N_V: torch.Tensor) -> dict[str, torch.Tensor]:
        model.zero_grad()
        torch.nn.functional.cross_entropy(logits_N_V, targets_N).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    torch.manual_seed(0)  # s_0 is drawn in train mode: same draw for both passes
    full = grads(model(input_ids=ids_B_T, attention_mask=mask_B_T).logits[select_B_T])
    torch.manual_seed(0)
    rows = grads(logits_at(model, select_B_T, ids_B_T, mask_B_T))
    assert full.keys() == rows.keys() and any("lora_A" in n for n in full)
    for name in full:
        torch.testing.assert_close(rows[name], full[name], rtol=1e-4, atol=1e-6, msg=name)


def test_hidden_states_and_head_are_the_models_own() -> None:
    looped = _model("looped")
    peft = _with_lora(looped)
    assert output_head(peft) is looped.get_output_embeddings()
    ids_B_T, mask_B_T = batch()
    h = final_hidden_states(peft, ids_B_T, mask_B_T)
    assert h.shape == (*ids_B_T.shape, looped.config.hidden_size)
    assert isinstance(looped, RecurrentForCausalLM)


@pytest.mark.parametrize(
    ("n", "chunk", "expected"),
    [(10, 0, [(0, 10)]), (10, 10, [(0, 10)]), (10, 4, [(0, 4), (4, 8), (8, 10)]), (0, 4, [(0, 0)])],
)
def test_chunked_rows_cover_every_row_once(n, chunk, expected) -> None:
    assert [(s.start, s.stop) for s in chunked_rows(n, chunk)] == expected
