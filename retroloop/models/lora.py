"""The LoRA configuration for any causal LM here: a source of any family or a looped model.

"LoRA Without Regret" (Schulman et al. 2025; DESIGN.md §5): adapt every linear layer (the MLP
matters most), W' = W + (α/r)·B·A with B = 0 at the start. `all-linear` is resolved here to
the leaf names of every `nn.Linear` of the decoder layers, whatever the family calls them (q/k/v/o
and gate/up/down projections for Llama, Qwen2/3, OLMo-2, Mistral, Gemma-2/3, SmolLM3; Phi-3's
fused qkv_proj and gate_up_proj; tests/unit/test_families.py), never the LM head; PEFT's own
"all-linear" would also wrap the looped model's input adapter, a full trainable module instead.

For a `RecurrentForCausalLM`, the recurrence input adapter A (Linear 2h → h) goes in
`modules_to_save` when `train_adapter` is set, so it is trained in full and saved with the
LoRA weights; otherwise it stays frozen at its initialisation (`[I | 0]` for repeat-block; for
pass-input `[0 | I]` that would make recurrence inert, which `retroloop.config` rejects).
"""

from __future__ import annotations

import torch
from peft import LoraConfig, TaskType
from torch import nn

from retroloop.config import LoraParams
from retroloop.errors import ConfigError
from retroloop.models.recurrent import RecurrentForCausalLM


def lora_config_for(
    model: nn.Module,
    *,
    r: int,
    alpha: float,
    dropout: float,
    target_modules: str | list[str] = "all-linear",
    train_adapter: bool = True,
) -> LoraConfig:
    """A PEFT `LoraConfig` (task CAUSAL_LM, no bias) for `model`; see the module docstring."""
    adapter = recurrence_adapter_name(model)
    if target_modules == "all-linear":
        targets: str | list[str] = linear_targets(model, exclude=[adapter] if adapter else [])
    else:
        targets = target_modules
        listed = [targets] if isinstance(targets, str) else list(targets)
        if adapter and any(adapter == t or adapter.endswith("." + t) for t in listed):
            raise ConfigError(
                f"lora.target_modules: {adapter!r} is the recurrence input adapter; leave it out "
                "(train_adapter: true trains it in full via modules_to_save)"
            )
    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=targets,
        modules_to_save=[adapter] if adapter and train_adapter else None,
        bias="none",
        task_type=TaskType.CAUSAL_LM,
    )


def lora_config_from(model: nn.Module, lora: LoraParams) -> LoraConfig:
    """`lora_config_for` with the fields of a `distill.lora` / `opd.lora` section."""
    return lora_config_for(
        model,
        r=lora.r,
        alpha=lora.alpha,
        dropout=lora.dropout,
        target_modules=lora.target_modules,
        train_adapter=lora.train_adapter,
    )


def recurrence_adapter_name(model: nn.Module) -> str | None:
    """The module path of the looped model's input adapter (`model.adapter`), or None."""
    if not isinstance(model, RecurrentForCausalLM):
        return None
    return next(name for name, module in model.named_modules() if module is model.model.adapter)


def linear_targets(model: nn.Module, exclude: list[str]) -> list[str]:
    """Every `nn.Linear` except the LM head and `exclude`, as leaf names when those are unambiguous.

    Leaf names (`q_proj`, …) keep the adapter portable (vLLM's LoRA loader, other checkpoints of
    the same family); full paths are used only if a leaf name is shared with an excluded module.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    skip = set(exclude) | {name for name, module in model.named_modules() if module is head}
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    kept = [name for name in linears if name not in skip]
    if not kept:
        raise ConfigError(
            f"lora.target_modules: {type(model).__name__} has no linear layer to adapt"
        )
    leaves = {name.rsplit(".", 1)[-1] for name in kept}
    if leaves & {name.rsplit(".", 1)[-1] for name in skip}:
        return sorted(kept)
    return sorted(leaves)


def fp32_trainable(model: nn.Module) -> nn.Module:
    """Keep every trainable bf16/fp16 module (the recurrence adapter in `modules_to_save`) in
    fp32, computing on an fp32 copy of its input and returning the model's dtype; `model`.

    PEFT already upcasts LoRA's A and B (`autocast_adapter_dtype`) but leaves a
    `modules_to_save` copy in the base's dtype. There an AdamW step (≈ lr ≤ 1e-3) on a weight
    near 1 is under half the bf16 spacing (2⁻⁹ ≈ 2e-3) and rounds away: on the tiny profile
    every diagonal entry of the pass-input adapter's `[0 | I]` half stayed exactly 1 through a
    bf16 distill. Frozen weights stay in the run's dtype; a no-op in fp32."""
    low = (torch.bfloat16, torch.float16)
    for module in list(model.modules()):
        own = list(module.parameters(recurse=False))
        if not any(p.requires_grad and p.dtype in low for p in own):
            continue
        dtype = own[0].dtype
        module.float()
        module.register_forward_pre_hook(lambda _m, args: tuple(_up(a) for a in args))
        module.register_forward_hook(lambda _m, _a, out, dtype=dtype: out.to(dtype))
    return model


def _up(x):
    return x.float() if isinstance(x, torch.Tensor) and x.is_floating_point() else x
