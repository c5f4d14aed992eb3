"""LoRA configs: every decoder linear adapted, never the head; the looped model's input adapter trained in full."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.utils import ModulesToSaveWrapper
from test_recurrent import tiny_source
from torch import nn
from transformers import LlamaForCausalLM

from retroloop.errors import ConfigError
from retroloop.models.lora import lora_config_for
from retroloop.models.recurrent import convert_from_source

LLAMA_LINEARS = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    return tiny_source("llama", seed)


def tiny_looped(seed: int = 0):
    return convert_from_source(
        tiny_llama(seed), prelude=[0], block=[2, 3], coda=[5], recurrence=2, state_init_std=0.0
    )


def test_all_linear_reaches_every_prelude_block_and_coda_linear():
    looped = tiny_looped()
    cfg = lora_config_for(looped, r=4, alpha=32, dropout=0.0)
    assert sorted(cfg.target_modules) == LLAMA_LINEARS
    assert cfg.modules_to_save == ["model.adapter"]
    linears = [
        name
        for name, module in looped.named_modules()
        if isinstance(module, nn.Linear)
        and name.startswith(("model.prelude.", "model.block.", "model.coda."))
    ]
    assert len(linears) == 7 * 4
    peft_model = get_peft_model(looped, cfg)
    wrapped = dict(peft_model.base_model.model.named_modules())
    assert all(isinstance(wrapped[name], LoraLayer) for name in linears)
    trunk = peft_model.base_model.model.model
    assert not isinstance(peft_model.base_model.model.lm_head, LoraLayer)
    assert isinstance(trunk.adapter, ModulesToSaveWrapper)
    assert not isinstance(trunk.adapter.original_module, LoraLayer)
    assert all(p.requires_grad for p in trunk.adapter.modules_to_save.parameters())
    assert not trunk.embed_tokens.weight.requires_grad


def test_adapter_stays_frozen_without_train_adapter():
    looped = tiny_looped()
    cfg = lora_config_for(looped, r=4, alpha=32, dropout=0.0, train_adapter=False)
    assert cfg.modules_to_save is None
    peft_model = get_peft_model(looped, cfg)
    assert not peft_model.base_model.model.model.adapter.weight.requires_grad


def test_plain_llama_gets_the_standard_projection_names():
    cfg = lora_config_for(tiny_llama(), r=1, alpha=32, dropout=0.0)
    assert sorted(cfg.target_modules) == LLAMA_LINEARS
    assert cfg.modules_to_save is None
    peft_model = get_peft_model(tiny_llama(), cfg)
    assert sum(isinstance(m, LoraLayer) for m in peft_model.modules()) == 7 * 6
    assert not isinstance(peft_model.base_model.model.lm_head, LoraLayer)


def test_explicit_targets_pass_through_but_not_the_adapter():
    cfg = lora_config_for(
        tiny_looped(), r=4, alpha=32, dropout=0.1, target_modules=["q_proj", "v_proj"]
    )
    assert set(cfg.target_modules) == {"q_proj", "v_proj"} and cfg.lora_dropout == 0.1
    with pytest.raises(ConfigError, match="adapter"):
        lora_config_for(
            tiny_looped(), r=4, alpha=32, dropout=0.0, target_modules=["q_proj", "adapter"]
        )


def test_lora_adapter_on_looped_model_round_trips_through_peft(tmp_path):
    ids_B_T = torch.randint(3, 256, (2, 8), generator=torch.Generator().manual_seed(1))
    peft_model = get_peft_model(
        tiny_looped(), lora_config_for(tiny_looped(), r=4, alpha=32, dropout=0.0)
    )
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if (
                "lora_B" in name or "modules_to_save" in name
            ):  # B = 0 at init: make the adapter matter
                param.add_(0.05 * torch.randn_like(param))
        want = peft_model(input_ids=ids_B_T, use_cache=False).logits
    peft_model.save_pretrained(tmp_path / "adapter")

    fresh = tiny_looped()
    with torch.no_grad():
        plain = fresh(input_ids=ids_B_T, use_cache=False).logits
    assert not torch.allclose(plain, want, atol=1e-3)  # the adapter changes the model
    loaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter")
    with torch.no_grad():
        got = loaded(input_ids=ids_B_T, use_cache=False).logits
    assert torch.allclose(got, want, atol=1e-6)
