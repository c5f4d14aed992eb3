"""The LM head only where a loss reads it.

A causal LM's forward ends with `logits = head(h)` at every position: `[B, T, V]`, which for a
49k-token vocabulary is the largest tensor of a training step (and the largest share of the
step's memory traffic: cast, log-softmax, gather and their gradients each copy it). Distillation
and OPD read logits only at trained / generated positions, so these helpers run the decoder body
once and the head on the selected hidden states only (the same idea as `logits_to_keep` in
transformers, which keeps one contiguous range for the whole batch, not a per-row mask).

Works for any Hugging Face causal LM whose `get_decoder()` returns the body (Llama, Qwen2, …),
for `RecurrentForCausalLM` (its `final_hidden_states`), and for either wrapped by PEFT: LoRA
layers are injected into the modules in place, so calling the body directly still applies them.

A family that soft-caps its final logits (Gemma-2/3: logits = c·tanh(logits / c), in its causal
LM's forward, not in its head) gets a head that does the same (`SoftcappedHead`), so these
helpers, and everything that applies `output_head` itself (distill's chunked loss), give the
model's own logits.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from retroloop.models.families import final_logit_softcap, softcap_logits


def _unwrapped(model: nn.Module) -> nn.Module:
    """The transformers model inside a `PeftModel` (LoRA already injected), else the model."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def final_hidden_states(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, **forward_kw: Any
) -> Tensor:
    """The head's input h `[B, T, H]` (after the final norm), without a KV cache.

    `forward_kw`: model-specific extras (`num_recurrence`, `bptt_k` for the looped model).
    """
    base = _unwrapped(model)
    own = getattr(base, "final_hidden_states", None)
    if callable(own):  # RecurrentForCausalLM
        return own(input_ids, attention_mask, use_cache=False, **forward_kw)[0]
    out = base.get_decoder()(
        input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **forward_kw
    )
    return out.last_hidden_state


class SoftcappedHead(nn.Module):
    """head(h), then the family's final-logit soft-cap c·tanh(· / c)."""

    def __init__(self, head: nn.Module, cap: float):
        super().__init__()
        self.head, self.cap = head, float(cap)

    def forward(self, hidden: Tensor) -> Tensor:
        return softcap_logits(self.head(hidden), self.cap)


def output_head(model: nn.Module) -> nn.Module:
    """The LM head (`get_output_embeddings()`), PEFT-wrapped or not; with the final-logit soft-cap
    for a family that has one (`SoftcappedHead`)."""
    base = _unwrapped(model)
    head = base.get_output_embeddings()
    if head is None:
        raise TypeError(f"{type(model).__name__} has no output embeddings (not a causal LM?)")
    cap = final_logit_softcap(base)
    return head if cap is None else SoftcappedHead(head, cap)


def logits_at(
    model: nn.Module,
    select_B_T: Tensor,
    input_ids: Tensor,
    attention_mask: Tensor,
    **forward_kw: Any,
) -> Tensor:
    """Logits `[N, V]` at the N positions where `select_B_T` is True, in row-major order.

    Equal to `model(input_ids, attention_mask).logits[select_B_T]`, with the head applied to N
    rows instead of B·T.
    """
    hidden = final_hidden_states(model, input_ids, attention_mask, **forward_kw)
    return output_head(model)(hidden[select_B_T.to(hidden.device)])


def chunked_rows(n_rows: int, chunk_rows: int) -> list[slice]:
    """Row slices of at most `chunk_rows` (0 or ≥ n: one slice) covering `range(n_rows)`."""
    if chunk_rows <= 0 or chunk_rows >= n_rows:
        return [slice(0, n_rows)]
    return [slice(i, min(i + chunk_rows, n_rows)) for i in range(0, n_rows, chunk_rows)]
