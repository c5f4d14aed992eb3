"""OPD's way in and way out (`opd_loop.train_opd`): the refusals before a run, the
rollouts of every rank put back in the one-process order, the artifact's files and the run's
summary metrics, and the student it starts from (the distill adapter, or a fresh LoRA).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import polars as pl
import torch

from retroloop.config import OpdParams
from retroloop.errors import ConfigError, DataError
from retroloop.geometry import plot_geometry
from retroloop.onpolicy import check_same_tokenizer
from retroloop.opd_progress import Progress
from retroloop.rollout import RolloutBatch
from retroloop.steplog import edge_steps

log = logging.getLogger(__name__)


def validation_split(
    prompts_df: pl.DataFrame, p: OpdParams
) -> tuple[pl.DataFrame, list[str] | None]:
    """(the prompts OPD trains on, the `opd.heldout_prompts` it scores to pick its kept step):
    the last rows of the train split, never drawn for training. Not `instruct_eval`: evaluate
    reports the sampled KL on those prompts, and keeping the step that scores best on the final
    report's own prompts would be selection on the test set."""
    n = p.heldout_prompts
    if n == 0:
        return prompts_df, None
    if prompts_df.height < n + p.prompts_per_step:
        raise ConfigError(
            f"opd.heldout_prompts: {n} held out of the instruct train split's {prompts_df.height} "
            f"prompts leave fewer than opd.prompts_per_step ({p.prompts_per_step}) to train on; "
            "lower opd.heldout_prompts or raise prepare.instructions.max_records"
        )
    return prompts_df.head(prompts_df.height - n), prompts_df.tail(n)["prompt"].to_list()


def check_inputs(student, tokenizer, prompts_df, p: OpdParams, teacher_tokenizer, checkpoints, env):  # fmt: skip
    """Refuse what `train_opd` cannot run on (one line each); its trainable parameters."""
    if teacher_tokenizer is not None:
        check_same_tokenizer(tokenizer, teacher_tokenizer)
    if p.prompts_per_step < env.world_size:
        raise ConfigError(
            f"opd.prompts_per_step: {p.prompts_per_step} is fewer than the {env.world_size} "
            "processes (launch.nproc_per_node x nnodes): each rank samples at least one prompt "
            "per step; raise opd.prompts_per_step or launch fewer processes"
        )
    need = ["prompt"] + (["instruction_id_list", "kwargs"] if p.reward_weight > 0 else [])
    if prompts_df.height == 0 or any(c not in prompts_df.columns for c in need):
        raise DataError(f"opd: prompts need columns {need} and >= 1 row; got {prompts_df.columns}")
    if p.rollout.temperature != 1.0 or p.rollout.top_p != 1.0:
        log.warning(
            "opd.rollout: temperature/top-p != 1 samples a distribution that is not the student's"
        )
    trainable = [q for q in student.parameters() if q.requires_grad]
    if not trainable:
        raise ConfigError(
            "opd: the student has no trainable parameters (load the adapter with is_trainable=True)"
        )
    if checkpoints is not None and checkpoints.steps != p.steps:
        raise ConfigError(f"opd: checkpoints for {checkpoints.steps} steps, the run has {p.steps}")
    return trainable


def gather_rollouts(batch: RolloutBatch, teacher_lp: list, rewards: list | None, first: int, env):
    """Every rank's rollouts, teacher log-probs and rewards in the one-process order (rank
    order; `first`: this rank's first prompt of the step). One process: unchanged."""
    if env.world_size == 1:
        return batch, teacher_lp, rewards
    batch.prompt_index = [i + first for i in batch.prompt_index]
    parts: list[Any] = [None] * env.world_size
    torch.distributed.all_gather_object(parts, (batch, teacher_lp, rewards))
    out, lps, rws = RolloutBatch(), [], []
    for b, lp, rw in parts:
        for name in ("prompt_index", "sample_index", "prompt_ids", "completion_ids",
                     "sampler_logprobs", "finished"):  # fmt: skip
            getattr(out, name).extend(getattr(b, name))
        out.seconds = max(out.seconds, b.seconds)
        lps += lp
        rws += rw or []
    return out, lps, (rws if rewards is not None else None)


def write_outputs(out_dir: Path, student, progress: Progress, tracker) -> pl.DataFrame:
    """The artifact's files (`OUTPUTS` but dvclive, which the step log wrote); the geometry."""
    geometry = tracker.frame()
    pl.concat(progress.rollouts).write_parquet(out_dir / "rollouts.parquet")
    geometry.write_parquet(out_dir / "geometry.parquet")
    plot_geometry(geometry, out_dir / "geometry.png")
    student.save_pretrained(out_dir / "adapter")
    shutil.rmtree(out_dir / ".rollout_adapter", ignore_errors=True)
    return geometry


def summary(p, progress: Progress, geometry, n_trainable, fraction) -> dict[str, Any]:
    """The run's metrics; `*_start` / `*_end` are means over the first / last `fraction`.
    `kept_step`: the published adapter's step (0: the starting adapter), `improved`: whether
    its held-out reverse KL is below the start's (None without held-out prompts)."""
    steps_df = pl.DataFrame(progress.rows)
    last = progress.heldout[-1]["value"] if progress.heldout else None
    edge = edge_steps(p.steps, fraction)
    total_s, tokens = steps_df["step_s"].sum(), steps_df["tokens"].sum()
    final = geometry.filter(pl.col("step") == p.steps).fill_nan(None)
    return {
        "steps": p.steps,
        "reverse_kl_topk_lb_start": steps_df["reverse_kl_topk_lb"].head(edge).mean(),
        "reverse_kl_topk_lb_end": steps_df["reverse_kl_topk_lb"].tail(edge).mean(),
        "heldout_reverse_kl_exact_before": progress.kl_before,
        "heldout_reverse_kl_exact_after": last,  # the last step's, published or not
        "heldout_reverse_kl_exact_kept": progress.best_value,
        "heldout_eval_every": p.eval_every,
        "kept_step": p.steps if progress.best_step is None else progress.best_step,
        "improved": None if last is None else progress.best_step != 0,
        "sampled_reverse_kl_mean": steps_df["reverse_kl_sampled"].mean(),
        "sampler_learner_kl_mean": steps_df["sampler_learner_kl"].mean(),
        "mean_response_length": steps_df["response_length"].mean(),
        "generated_tokens": int(tokens),
        "tokens_per_s": tokens / total_s,
        "rollout_tokens_per_s": tokens / steps_df["rollout_s"].sum(),
        "teacher_scoring_share": steps_df["teacher_s"].sum() / total_s,
        "reward_mean": steps_df["reward"].mean() if p.reward_weight > 0 else None,
        "trainable_parameters": n_trainable,
        "geometry_effective_rank": final["effective_rank"].mean(),
        "geometry_overlap_top_r": final["overlap_top_r"].mean(),
        "guard_rollouts": progress.guard,
    }


def load_student(base: torch.nn.Module, parent_adapter: Path, p: OpdParams) -> torch.nn.Module:
    """Continue the distill LoRA (`is_trainable=True`), or start a fresh one from `opd.lora`."""
    from peft import PeftModel, get_peft_model

    from retroloop.models.lora import fp32_trainable, lora_config_from

    if (Path(parent_adapter) / "adapter_config.json").is_file():
        log.info(
            "continuing the adapter at %s (its own LoRA config holds, not opd.lora)", parent_adapter
        )
        return fp32_trainable(
            PeftModel.from_pretrained(
                base, parent_adapter, is_trainable=True, trust_remote_code=False
            )
        )
    if not p.lora.enabled:
        raise ConfigError(
            "opd.lora.enabled: false needs a parent adapter; OPD trains LoRA adapters only"
        )
    log.warning("no parent adapter at %s: OPD starts a fresh LoRA (r=%d)", parent_adapter, p.lora.r)
    return fp32_trainable(get_peft_model(base, lora_config_from(base, p.lora)))
