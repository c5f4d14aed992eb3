"""On the tiny model and its teacher cache: distill's micro-batch loss (the cached branch of
`losses.distill_loss_sums`, one `_LogitStats` node) has the value and LoRA gradients of the
autograd composition it replaced (`F.cross_entropy` + `topk_tail_logprobs` + `gather_logprobs`
+ `forward_kl_sampled_tail` on the same trained rows)."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import torch
import torch.nn.functional as F
from helpers_distill import tiny, workdir  # noqa: F401  (fixture)

from retroloop import teacher_cache as tc
from retroloop.losses import (
    forward_kl_sampled_tail,
    gather_logprobs,
    teacher_topk_tail,
    topk_tail_logprobs,
)
from retroloop.models.head import final_hidden_states, output_head
from retroloop.models.loading import load_tokenizer
from retroloop.sequences import pad_batch, training_sequences
from retroloop.stages import distill

STUDENT = Path("data/convert/model")


def test_cached_micro_batch_loss_equals_the_autograd_composition_on_the_tiny_model(workdir) -> None:  # noqa: F811
    cfg = tiny()
    d, cpu = cfg.distill, torch.device("cpu")
    tok = load_tokenizer(STUDENT)
    frames = [pl.read_parquet(f"data/prepare/datasets/{n}_train.parquet") for n in ("instruct", "domain")]  # fmt: skip
    seqs = training_sequences(tok, *frames, cfg.prepare.max_seq_len)[:3]
    rows = [tc.TeacherCache("data/cache_teacher").rows(i) for i in range(3)]
    model = distill.load_student(STUDENT, cfg, cpu)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}

    def grads_of(loss: torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]:
        model.zero_grad()
        loss.backward()
        return float(loss.detach()), {n: p.grad.clone() for n, p in params.items()}

    torch.manual_seed(0)  # the looped student draws s_0 in train mode
    got = grads_of(distill.micro_batch_loss(model, seqs, tok.pad_token_id, d, 2, 2, cpu, None, rows)[0])  # fmt: skip

    torch.manual_seed(0)
    ids, mask, labels = pad_batch(seqs, tok.pad_token_id)
    keep = labels[:, 1:] != -100
    h = final_hidden_states(model, ids, mask, num_recurrence=2, bptt_k=2)[F.pad(keep, (0, 1))]
    z = output_head(model)(h)
    t = tc.batch_rows(rows, keep)
    assert "teacher_tail_ids_N_S" in t and d.divergence == "forward_kl" and d.teacher == "cached"
    T = d.temperature
    ce = F.cross_entropy(z, labels[:, 1:][keep], reduction="sum")
    s_C = topk_tail_logprobs(z, t["teacher_topk_ids_N_K"], T)
    s_S = gather_logprobs(z, t["teacher_tail_ids_N_S"], T)
    t_C = teacher_topk_tail(t["teacher_topk_logprobs_N_K"])
    kl = forward_kl_sampled_tail(t_C, s_C, t["teacher_tail_logprobs_N_S"], s_S).sum()
    ref = grads_of((d.alpha * ce + (1 - d.alpha) * T**2 * kl) / int(keep.sum()))

    assert got[0] == ref[0] or abs(got[0] - ref[0]) <= 1e-6 * abs(ref[0])
    for name, g in ref[1].items():
        torch.testing.assert_close(got[1][name], g, rtol=1e-4, atol=1e-7, msg=name)
