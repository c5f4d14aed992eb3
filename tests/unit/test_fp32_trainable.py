"""`lora.fp32_trainable`: a bf16 looped model's recurrence adapter (PEFT `modules_to_save`)
trains in fp32, as PEFT already keeps LoRA's A and B; in bf16 an AdamW step of ~lr on its
`[0 | I]` diagonal rounds away (found on the tiny profile's bf16 distill: not one diagonal
entry moved in 32 steps)."""

from __future__ import annotations

import torch
from peft import get_peft_model
from test_lora import tiny_looped

from retroloop.models.lora import fp32_trainable, lora_config_for


def _one_step(upcast: bool):
    """(peft model, its trainable adapter copy, the adapter weight before) after one AdamW
    step at lr 1e-3 on a bf16 looped model."""
    looped = tiny_looped().to(torch.bfloat16)
    model = get_peft_model(looped, lora_config_for(looped, r=4, alpha=32, dropout=0.0))
    if upcast:
        model = fp32_trainable(model)
    adapter = model.base_model.model.model.adapter.modules_to_save["default"]
    before = adapter.weight.detach().float().clone()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3, weight_decay=0.0)
    ids_B_T = torch.randint(0, looped.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))  # fmt: skip
    out = model(input_ids=ids_B_T, labels=ids_B_T)
    assert out.logits.dtype == torch.bfloat16  # the model still computes in the run's dtype
    out.loss.backward()
    optimizer.step()
    return model, adapter, before


def _diagonal_moved(adapter, before) -> float:
    """Share of the input half's identity diagonal that the step moved."""
    H = before.shape[0]
    return float(((adapter.weight.detach().float() - before)[:, H:].diagonal() != 0).float().mean())


def test_the_recurrence_adapter_trains_in_fp32_and_frozen_weights_stay_bf16() -> None:
    model, adapter, before = _one_step(upcast=True)
    dtypes = {(p.requires_grad, p.dtype) for p in model.parameters()}
    assert dtypes == {(True, torch.float32), (False, torch.bfloat16)}
    assert adapter.weight.dtype == torch.float32
    assert _diagonal_moved(adapter, before) == 1.0


def test_without_it_bf16_rounds_the_diagonal_updates_away() -> None:
    _, adapter, before = _one_step(upcast=False)
    assert adapter.weight.dtype == torch.bfloat16
    assert _diagonal_moved(adapter, before) == 0.0
    assert (adapter.weight.detach().float() != before).any()  # it did take the step elsewhere


def test_a_no_op_in_fp32() -> None:
    looped = tiny_looped()
    model = get_peft_model(looped, lora_config_for(looped, r=4, alpha=32, dropout=0.0))
    adapter = model.base_model.model.model.adapter.modules_to_save["default"]
    assert fp32_trainable(model) is model
    assert not adapter._forward_hooks and not adapter._forward_pre_hooks
