"""Retrofitted depth recurrence for any dense decoder transformers ships (Llama, Qwen2/3, OLMo-2,
Mistral, Gemma-2/3, Phi-3, SmolLM3, ...), built from the source's own classes.

The model (McLeish et al. 2025, "retrofitted recurrence", §3; Geiping et al. 2025, Huginn, eq. 1):

    e       = P(embed(x))                       prelude: the kept first layers
    s_0     ~ TruncNormal(0, σ²) on [−3σ, 3σ]    σ = `state_init_std` (0.0087)
    s_{k+1} = B(A([s_k ; e]))   for k < R        A: bias-free Linear(2h → h); B: the recurrent block
    logits  = head(norm(C(s_R)))                 coda: the kept last layers

Two initialisations of A (`adapter_init`, DESIGN.md §5), both reproducing the source with the
dropped layers removed at R = 1 (a random frozen adapter, the reference code's default, does not):

- `pass_input`: A = `[0 | I]`, s_0 ~ TruncNormal. A passes e through and multiplies s_k by zero,
  so every R gives the same output until the state half of A learns.
- `repeat_block`: A = `[I | 0]`, s_0 = e. A passes the state through, so R = k is exactly the
  block applied k times (layer repetition; the reference code's embed-init / skip-adapter modes).
  In training mode s_0 = e + TruncNormal noise, as pass-input's s_0 is noise around 0.

This module is the one import path for all of it (importing it registers the Auto classes); the
code lives beside it, one concern per module:

- `recurrent_model.py`: `RecurrentConfig`, `RecurrentForCausalLM` (forward, the loop with
  truncated BPTT and early exit, s_0) and the adapter's initial weights; the family hooks.
- `recurrent_loop.py`: what each layer reads in one call (masks, rotary embeddings per attention
  type), running a layer stack at its KV-cache slots, the cache's slot layout.
- `conversion.py`: source → looped model (`convert_from_source`), the R = 1 reference
  (`drop_layers`) and the equivalence check.
- `recurrence_schedule.py`: R sampled per training step and its ramped mean.
"""

from retroloop.models.conversion import (
    check_source,
    convert_from_source,
    drop_layers,
    equivalence_max_abs_diff,
)
from retroloop.models.recurrence_schedule import recurrence_mean_at, sample_recurrence
from retroloop.models.recurrent_loop import CACHE_KWARG
from retroloop.models.recurrent_model import (
    ADAPTER_INITS,
    RecurrentConfig,
    RecurrentForCausalLM,
    RecurrentModel,
    adapter_weight,
    pass_through_weight,
    repeat_block_weight,
)

__all__ = [
    "ADAPTER_INITS",
    "CACHE_KWARG",
    "RecurrentConfig",
    "RecurrentForCausalLM",
    "RecurrentModel",
    "adapter_weight",
    "check_source",
    "convert_from_source",
    "drop_layers",
    "equivalence_max_abs_diff",
    "pass_through_weight",
    "recurrence_mean_at",
    "repeat_block_weight",
    "sample_recurrence",
]
