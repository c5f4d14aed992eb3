"""The cached-teacher loss (`losses.cached_student_logprobs`, one `_LogitStats` node) equals the
autograd composition it replaced: `F.cross_entropy` + `topk_tail_logprobs` + `gather_logprobs`
(+ `forward_kl_sampled_tail`), in value and in the gradient w.r.t. the student logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from retroloop.losses import (
    distill_loss_sums,
    divergence_from_logprobs,
    forward_kl_sampled_tail,
    gather_logprobs,
    teacher_topk_tail,
    topk_tail_logprobs,
)

N, V, K, S, ALPHA = 41, 1500, 16, 2, 0.3


def _reference(z, targets, teacher, kind, temperature, tail):
    """The pre-`_LogitStats` implementation of `distill_loss_sums`' cached branch."""
    ce = F.cross_entropy(z.float(), targets, reduction="sum")
    t_C = teacher_topk_tail(teacher["teacher_topk_logprobs_N_K"])
    s_C = topk_tail_logprobs(z.float(), teacher["teacher_topk_ids_N_K"], temperature)
    if tail:
        s_S = gather_logprobs(z.float(), teacher["teacher_tail_ids_N_S"], temperature)
        kl = forward_kl_sampled_tail(t_C, s_C, teacher["teacher_tail_logprobs_N_S"], s_S).sum()
    else:
        kl = divergence_from_logprobs(t_C, s_C, kind, 0.5).sum()
    return ALPHA * ce + (1 - ALPHA) * temperature**2 * kl, ce, kl


def _case(scale: float, temperature: float, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(N, V, generator=gen) * scale
    t_logp = torch.log_softmax(torch.randn(N, V, generator=gen) * scale / temperature, -1)
    top = t_logp.topk(K)
    tail_ids = torch.randint(0, V, (N, S), generator=gen)
    teacher = {
        "teacher_topk_logprobs_N_K": top.values,
        "teacher_topk_ids_N_K": top.indices.to(torch.uint16),
        "teacher_tail_logprobs_N_S": t_logp.gather(-1, tail_ids),
        "teacher_tail_ids_N_S": tail_ids,
    }
    return z, torch.randint(0, V, (N,), generator=gen), teacher


CASES = [(kind, False) for kind in ("forward_kl", "reverse_kl", "jsd", "tvd")] + [
    ("forward_kl", True)
]


@pytest.mark.parametrize(("kind", "tail"), CASES)
@pytest.mark.parametrize(("scale", "temperature"), [(1.0, 1.0), (4.0, 2.0), (12.0, 0.7)])
def test_cached_loss_and_gradient_equal_the_autograd_composition(kind, tail, scale, temperature):
    z, targets, teacher = _case(scale, temperature)
    if not tail:
        teacher = {k: v for k, v in teacher.items() if "tail" not in k}
    z_ref, z_new = z.clone().requires_grad_(), z.clone().requires_grad_()
    ref = _reference(z_ref, targets, teacher, kind, temperature, tail)
    got = distill_loss_sums(z_new, targets, alpha=ALPHA, temperature=temperature, kind=kind, **teacher)  # fmt: skip
    for r, g in zip(ref, got, strict=True):
        assert float(g.detach()) == pytest.approx(float(r.detach()), rel=1e-6, abs=1e-6)
    ref[0].backward()
    got[0].backward()
    torch.testing.assert_close(z_new.grad, z_ref.grad, rtol=1e-5, atol=1e-7)


def test_cached_loss_gradient_flows_to_bf16_logits_and_empty_batches():
    z, targets, teacher = _case(3.0, 2.0)
    z16 = z.bfloat16().requires_grad_()
    loss = distill_loss_sums(z16, targets, alpha=ALPHA, temperature=2.0, kind="forward_kl", **teacher)[0]  # fmt: skip
    loss.backward()
    z32 = z16.detach().float().requires_grad_()
    _reference(z32, targets, teacher, "forward_kl", 2.0, True)[0].backward()
    assert z16.grad.dtype == torch.bfloat16
    torch.testing.assert_close(z16.grad.float(), z32.grad.bfloat16().float())
    empty = {k: v[:0] for k, v in teacher.items()}
    z0 = z[:0].clone().requires_grad_()
    loss0 = distill_loss_sums(z0, targets[:0], alpha=ALPHA, temperature=2.0, kind="forward_kl", **empty)[0]  # fmt: skip
    loss0.backward()
    assert float(loss0.detach()) == 0.0 and z0.grad.shape == (0, V)
