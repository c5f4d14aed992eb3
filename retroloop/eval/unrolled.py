"""A looped model's logits at several recurrence counts from one unrolled pass.

The looped forward (Geiping et al. 2025, eq. 1) is e = P(embed(x)), s_{k+1} = B(A([s_k ; e])),
logits_R = head(norm(C(s_R))). In eval mode s_0 is a constant (`initial_state`), so s_k does not
depend on R: the pass at R = 8 goes through s_1, s_2 and s_4 on its way. Evaluating held-out
NLL and KL at R ∈ {1, 2, 4, 8} one forward per R runs P + C and the block 1 + 2 + 4 + 8 = 15
times; unrolled once it runs the prelude once, the block 8 times and only the coda + head at
each requested R: (P + 8·B + 4·(C + head)) instead of (4·P + 15·B + 4·(C + head)) layer calls.

The same layers run on the same tensors in the same order as `final_hidden_states` + `forward`
(no cache, default positions), so each R's logits are bit-identical to `model(...,
num_recurrence=R).logits` (tests/unit/test_unrolled_eval.py asserts `torch.equal`). Not for
early exit (`config.early_exit_kl`: the probe decides where each pass stops) or training (s_0
is random there): `supports_unrolled` says when it applies.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from retroloop.models.families import final_logit_softcap, softcap_logits
from retroloop.models.recurrent_loop import layer_inputs, run_layers


def supports_unrolled(model: nn.Module) -> bool:
    """A looped model in eval mode without early exit: its states do not depend on R."""
    from retroloop.models.recurrent import RecurrentForCausalLM

    return (
        isinstance(model, RecurrentForCausalLM)
        and not model.training
        and model.config.early_exit_kl is None
    )


@torch.inference_mode()
def logits_at_recurrences(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, Rs: Sequence[int]
) -> Iterator[tuple[int, Tensor]]:
    """(R, logits_B_T_V) for each R of `Rs` in increasing order, from one unrolled pass.

    Mirrors `RecurrentForCausalLM.forward` with `use_cache=False`; one R's logits are alive at a
    time (the caller consumes each before the next is made)."""
    assert supports_unrolled(model), "unrolled evaluation needs a looped model in eval mode"
    wanted = sorted({int(R) for R in Rs})
    if not wanted or wanted[0] < 1:
        raise ValueError(f"recurrence counts must be >= 1, got {list(Rs)}")
    m, cfg = model.model, model.config
    impl = cfg._attn_implementation  # as final_hidden_states: the family's kernel, else eager
    m.layer_config._attn_implementation = impl if impl in m.family.attn_implementations else "eager"
    embeds_B_T_H = m.embed_tokens(input_ids)
    x = layer_inputs(m, embeds_B_T_H, attention_mask, None, None)
    e_B_T_H = run_layers(m, "prelude", embeds_B_T_H, 0, x)
    s_B_T_H = model.initial_state(e_B_T_H)
    P, B, C = len(m.prelude), len(m.block), len(m.coda)
    cap = final_logit_softcap(model)
    for k in range(wanted[-1]):
        slot = P + C + k * B
        s_B_T_H = run_layers(m, "block", m.adapter(torch.cat([s_B_T_H, e_B_T_H], dim=-1)), slot, x)
        if k + 1 in wanted:
            hidden_B_T_H = m.norm(run_layers(m, "coda", s_B_T_H, P, x))
            yield k + 1, softcap_logits(model.lm_head(hidden_B_T_H), cap)


def logits_per_key(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, forward_kwargs: dict, keys: list
) -> Iterator[tuple[int | None, Tensor]]:
    """(key, logits_B_T_V): one plain forward with `forward_kwargs` when `keys` is [None], else
    each R of `keys` from one unrolled pass (then `forward_kwargs` must not set the recurrence)."""
    if keys == [None]:
        yield (
            None,
            model(input_ids=input_ids, attention_mask=attention_mask, **forward_kwargs).logits,
        )
        return
    assert "num_recurrence" not in forward_kwargs, "the recurrences are the keys"
    yield from logits_at_recurrences(model, input_ids, attention_mask, keys)
