"""prepare → analyze → convert on the tiny profile, in a temporary directory.

The three stages run once per module (`built`); each test then reads their artifacts:
the manifest contract (DESIGN.md §3), the Parquet schemas and the train/eval split, the
model directories loading with Hugging Face, the redundancy table and split, the R = 1
equivalence, and the lineage from the converted model back to prepare. The bad-input
tests run a stage in their own empty directory and check it fails with the named error
before writing anything.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import polars as pl
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from retroloop import cli, datasets
from retroloop.artifacts import MANIFEST, hash_tree, read_manifest
from retroloop.config import load_params
from retroloop.errors import ConfigError, DataError, ModelError
from retroloop.models.loading import load_model, load_tokenizer
from retroloop.models.recurrent import (
    RecurrentForCausalLM,
    adapter_weight,
    drop_layers,
    equivalence_max_abs_diff,
)
from retroloop.provenance import lineage, verify
from retroloop.stages import analyze, convert, prepare
from tests.conftest import TINY_PROFILE

STAGE_DIRS = {
    "prepare": Path("data/prepare"),
    "analyze": Path("data/analyze"),
    "convert": Path("data/convert"),
}
CONTRACT_KEYS = {
    "kind", "stage", "content_sha256", "files", "outputs", "inputs", "params", "params_sha256",
    "seed", "code_version", "library_versions", "device", "started_at", "ended_at", "metrics",
}  # fmt: skip
KINDS = {"prepare": "model", "analyze": "analysis", "convert": "model"}
INPUT_ROLES = {
    "prepare": set(),  # tiny_random model and built-in data: no upstream file to reference
    "analyze": {"base_model", "calibration_instruct", "calibration_domain"},
    "convert": {"base_model", "split", "heldout"},
}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny profile's prepare, analyze and convert, run once in a module temp dir."""
    root = tmp_path_factory.mktemp("prepare_analyze_convert")
    cfg = load_params(TINY_PROFILE)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        for stage in (prepare, analyze, convert):
            stage.run(cfg)
    return root


@pytest.fixture
def workdir(built: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(built)
    return built


def _model_subtree_sha256(prepare_files: dict[str, str]) -> str:
    """Hash of `model/` from the prepare manifest's per-file hashes (hash_tree's listing)."""
    sub = {k.removeprefix("model/"): v for k, v in prepare_files.items() if k.startswith("model/")}
    return hashlib.sha256(
        "".join(f"{k}\0{v}\n" for k, v in sorted(sub.items())).encode()
    ).hexdigest()


# --------------------------------------------------------------------------- manifests


@pytest.mark.parametrize("stage", list(STAGE_DIRS))
def test_manifest_has_the_contract_keys_and_matches_its_files(workdir: Path, stage: str) -> None:
    directory = STAGE_DIRS[stage]
    raw = json.loads((directory / MANIFEST).read_text())
    assert CONTRACT_KEYS <= raw.keys()
    manifest = read_manifest(directory)
    cfg = load_params(TINY_PROFILE)
    assert manifest.kind == KINDS[stage] and manifest.stage == stage
    assert manifest.content_sha256 == hash_tree(directory)[0] and not verify(directory)
    assert manifest.params == json.loads(json.dumps(cfg.section(stage), default=str))
    assert manifest.params_sha256 == cfg.section_sha256(stage) and manifest.seed == cfg.seed
    assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?|unknown", manifest.code_version)
    assert {"python", "torch", "transformers"} <= manifest.library_versions.keys()
    assert {ref.role for ref in manifest.inputs} == INPUT_ROLES[stage]
    assert all(re.fullmatch(r"[0-9a-f]{64}", ref.content_sha256) for ref in manifest.inputs)
    assert (
        manifest.metrics
        and json.loads((directory / "metrics.json").read_text()) == manifest.metrics
    )
    assert not list(Path("data").glob(".*"))  # no temporary or old directories left behind


def test_downstream_inputs_carry_the_upstream_hashes(workdir: Path) -> None:
    prep, ana, conv = (read_manifest(d) for d in STAGE_DIRS.values())
    model_sha = _model_subtree_sha256(prep.files)
    assert model_sha == hash_tree(Path("data/prepare/model"))[0]
    assert ana.input("base_model").content_sha256 == model_sha
    assert (
        ana.input("calibration_instruct").content_sha256
        == prep.files["datasets/instruct_train.parquet"]
    )
    assert (
        ana.input("calibration_domain").content_sha256
        == prep.files["datasets/domain_train.parquet"]
    )
    assert conv.input("base_model").content_sha256 == model_sha
    assert conv.input("split").content_sha256 == ana.files["split.json"]
    assert conv.input("heldout").content_sha256 == prep.files["datasets/domain_eval.parquet"]


# --------------------------------------------------------------------------- prepare


@pytest.mark.learning
def test_prepare_trains_the_tiny_teacher_far_from_uniform(workdir: Path) -> None:
    """Every learning assertion downstream needs a teacher worth imitating: the tiny profile
    trains it until its held-out domain NLL is below 4 nats (uniform: ln 512 = 6.24; measured
    3.08 / 3.09 / 3.52 for seeds 0 / 1 / 2 on default, AVX2 and AVX-512 kernels alike,
    `python -m benchmarks.tiny_margins`). With the old 200 steps at LR 5e-3 it ended at
    5.0-5.25 depending on the kernel: an untrained model fails this, as does train_steps: 0."""
    import math

    from tests.stage.helpers_distill import held_out_kl

    nll = held_out_kl(Path("data/prepare/model"), Rs=(None,))[None]["nll"]
    vocab = load_params(TINY_PROFILE).prepare.model.tiny.vocab_size
    assert nll < 4.0, f"tiny teacher held-out NLL {nll:.3f} (uniform {math.log(vocab):.2f})"
    m = read_manifest(STAGE_DIRS["prepare"]).metrics
    assert m["train_loss_end"] < m["train_loss_start"] - 0.9, m  # measured: drops by ≥ 2.81


def test_manifest_records_the_compute_it_ran_on(workdir: Path) -> None:
    """Hashes are reproducible per CPU kernel level (README, lineage), so every manifest says
    which one it ran on, with the device; `retroloop audit` shows both."""
    import torch

    for directory in STAGE_DIRS.values():
        manifest = read_manifest(directory)
        assert manifest.environment["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
        assert manifest.environment["cpu"] and manifest.device == "cpu"
        assert manifest.environment["torch_threads"] == load_params(TINY_PROFILE).threads


def test_datasets_have_the_fixed_schemas_and_disjoint_splits(workdir: Path) -> None:
    metrics = read_manifest(STAGE_DIRS["prepare"]).metrics
    for name, schema in (("domain", datasets.TEXT_SCHEMA), ("instruct", datasets.CHAT_SCHEMA)):
        train = pl.read_parquet(f"data/prepare/datasets/{name}_train.parquet")
        held_out = pl.read_parquet(f"data/prepare/datasets/{name}_eval.parquet")
        for split, frame in (("train", train), ("eval", held_out)):
            assert frame.schema == schema, f"{name}_{split}"
            assert frame.height > 0 and frame["id"].n_unique() == frame.height
            assert metrics[f"{name}_{split}_records"] == frame.height
        assert not set(train["id"]) & set(held_out["id"]), f"{name}: train and eval share ids"
    instruct_train = pl.read_parquet("data/prepare/datasets/instruct_train.parquet")
    assert instruct_train["response"].null_count() == 0  # the teacher wrote the targets


def test_prepared_model_loads_with_hugging_face_and_has_a_chat_template(workdir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained("data/prepare/model")
    tokenizer = AutoTokenizer.from_pretrained("data/prepare/model")
    cfg = load_params(TINY_PROFILE)
    assert model.config.model_type == "llama"
    assert model.config.num_hidden_layers == cfg.prepare.model.tiny.num_hidden_layers
    assert not hasattr(model.config, "quantization_config")
    assert tokenizer.chat_template
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert rendered.startswith("<|im_start|>user") and rendered.endswith("<|im_start|>assistant\n")
    metrics = read_manifest(STAGE_DIRS["prepare"]).metrics
    assert metrics["vocab_size"] == len(tokenizer) == model.config.vocab_size


# --------------------------------------------------------------------------- analyze


def test_layer_scores_cover_both_variants_and_block_sizes(workdir: Path) -> None:
    N = read_manifest(STAGE_DIRS["prepare"]).metrics["num_hidden_layers"]
    table = pl.read_parquet("data/analyze/layer_scores.parquet")
    assert {"layer", "n", "block_influence", "angular_distance", "variant"} <= set(table.columns)
    assert set(table["variant"]) == {"all_tokens", "last_token"}
    for variant in ("all_tokens", "last_token"):
        rows = table.filter(pl.col("variant") == variant)
        assert rows["n"].max() >= N // 2
        bi = rows.filter(pl.col("n") == 1)
        assert sorted(bi["layer"]) == list(
            range(N)
        )  # the last layer too (hooks, not hidden_states)
        assert bi["block_influence"].null_count() == 0
        assert rows.filter(pl.col("n") > 1)["block_influence"].null_count() == rows.height - N
        assert (rows["layer"] + rows["n"] <= N).all()
        assert rows["angular_distance"].is_between(0.0, 1.0).all()
    assert Path("data/analyze/redundancy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_split_covers_every_layer_with_a_contiguous_block(workdir: Path) -> None:
    cfg = load_params(TINY_PROFILE).analyze.split
    split = json.loads(Path("data/analyze/split.json").read_text())
    N = split["num_layers"]
    assert {"prelude", "block", "coda", "dropped", "rule"} <= split.keys() and split["rule"]
    assert sorted(split["prelude"] + split["block"] + split["coda"] + split["dropped"]) == list(
        range(N)
    )
    assert split["prelude"] == list(range(cfg.prelude_layers))
    assert split["coda"] == list(range(N - cfg.coda_layers, N))
    b = split["block"][0]
    assert split["block"] == list(range(b, b + cfg.block_layers))  # contiguous
    assert split["rule"].startswith("contiguous_min_angular_distance")
    assert cfg.variant in split["rule"]
    assert read_manifest(STAGE_DIRS["analyze"]).metrics["split"]["rule"] == split["rule"]
    # The dropped layers are the windows before and after the block inside the middle.
    middle = range(cfg.prelude_layers, N - cfg.coda_layers)
    assert split["dropped"] == [i for i in middle if i not in split["block"]]


# --------------------------------------------------------------------------- convert


def test_converted_model_loads_and_is_equivalent_at_r1(workdir: Path) -> None:
    manifest = read_manifest(STAGE_DIRS["convert"])
    split = json.loads(Path("data/analyze/split.json").read_text())
    looped = load_model("data/convert/model")
    assert isinstance(looped, RecurrentForCausalLM)
    cfg = looped.config
    assert (cfg.prelude_layers, cfg.block_layers, cfg.coda_layers) == (
        split["prelude"],
        split["block"],
        split["coda"],
    )
    assert manifest.metrics["equivalence_max_abs_diff"] <= 1e-5
    assert manifest.metrics["equivalence_tokens"] > 0
    h = cfg.hidden_size
    init = load_params(TINY_PROFILE).convert.init
    assert cfg.adapter_init == init == manifest.metrics["adapter_init"]
    assert torch.equal(looped.model.adapter.weight, adapter_weight(init, h))  # survives saving

    # The reloaded model, too, equals the source with the dropped layers removed.
    source = load_model("data/prepare/model")
    tokenizer = load_tokenizer("data/prepare/model")
    enc = tokenizer(
        ["def f(x): return x", "A list comprehension builds a list."],
        return_tensors="pt",
        padding=True,
    )
    reference = drop_layers(source, split["prelude"] + split["block"] + split["coda"])
    assert (
        equivalence_max_abs_diff(looped, reference, enc["input_ids"], enc["attention_mask"]) <= 1e-5
    )


def test_converted_model_records_the_source_hash(workdir: Path) -> None:
    prepare_files = read_manifest(STAGE_DIRS["prepare"]).files
    expected = _model_subtree_sha256(prepare_files)
    config = json.loads(Path("data/convert/model/config.json").read_text())
    assert config["source_sha256"] == expected
    assert read_manifest(STAGE_DIRS["convert"]).input("base_model").content_sha256 == expected
    assert config["source_model"] == "data/prepare/model"


def test_lineage_walks_from_the_converted_model_back_to_prepare(workdir: Path, capsys) -> None:
    tree = lineage("data/convert/model")
    assert tree["stage"] == "convert" and tree["kind"] == "model"
    by_role = {node["role"]: node for node in tree["inputs"]}
    assert by_role.keys() == INPUT_ROLES["convert"]
    assert by_role["base_model"]["stage"] == "prepare"
    assert by_role["split"]["stage"] == "analyze"

    def stages(node: dict) -> set[str]:
        found = {node.get("stage")}
        for child in node["inputs"] if isinstance(node.get("inputs"), list) else []:
            found |= stages(child)
        return found

    assert {"convert", "analyze", "prepare"} <= stages(tree)

    assert cli.main(["lineage", "data/convert/model", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == tree


# --------------------------------------------------------------------------- bad input


def test_manual_split_beyond_the_model_is_a_config_error(
    built: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    split = {"mode": "manual", "prelude": {"first": 0, "last": 1}, "block": {"first": 2, "last": 5},
             "coda": {"first": 6, "last": 9}}  # fmt: skip
    cfg = load_params(TINY_PROFILE, {"analyze.split": split})
    data = built / "data" / "prepare"
    inputs = {
        "base_model": data / "model",
        "calibration_instruct": data / "datasets" / "instruct_train.parquet",
        "calibration_domain": data / "datasets" / "domain_train.parquet",
    }
    with pytest.raises(ConfigError, match=r"analyze\.split\.coda\.last: layer 9 is beyond") as err:
        analyze.run(cfg, inputs=inputs)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "data").exists()


def test_local_model_path_that_is_not_a_model_dir_is_a_model_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    not_a_model = tmp_path / "weights"
    not_a_model.mkdir()
    (not_a_model / "README.md").write_text("no config.json here\n")
    cfg = load_params(
        TINY_PROFILE, {"prepare.model": {"source": "local", "path": str(not_a_model)}}
    )
    with pytest.raises(
        ModelError, match=r"prepare\.model\.path: .*weights is not a save_pretrained directory"
    ):
        prepare.run(cfg)
    assert not (tmp_path / "data").exists()


def test_a_local_model_of_a_family_the_loop_cannot_honour_is_one_line_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A MoE source (Qwen3-MoE) is refused when prepare loads it, before anything is written:
    one line naming the model type, what the looped model cannot reproduce and the tested
    families (never a silently different model later in convert)."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from retroloop.models.loading import build_tiny_tokenizer

    monkeypatch.chdir(tmp_path)
    tokenizer = build_tiny_tokenizer(["a tiny corpus for a tiny tokenizer"] * 4, 300)
    config = Qwen3MoeConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                            moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                            num_key_value_heads=1, num_experts=4, num_experts_per_tok=2)  # fmt: skip
    Qwen3MoeForCausalLM(config).save_pretrained(tmp_path / "moe")
    tokenizer.save_pretrained(tmp_path / "moe")
    cfg = load_params(
        TINY_PROFILE, {"prepare.model": {"source": "local", "path": str(tmp_path / "moe")}}
    )
    with pytest.raises(ModelError) as err:
        prepare.run(cfg)
    msg = str(err.value)
    assert "\n" not in msg
    assert re.search(r"'qwen3_moe' cannot be looped: a mixture-of-experts block .*tested "
                     r"families: llama, qwen2, qwen3, olmo2, mistral, gemma2, gemma3_text", msg)  # fmt: skip
    assert not (tmp_path / "data").exists()


def test_empty_local_dataset_is_a_data_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    empty = tmp_path / "docs.jsonl"
    empty.write_text("")
    cfg = load_params(
        TINY_PROFILE, {"prepare.domain": {"source": "local", "path": str(empty), "format": "text"}}
    )
    with pytest.raises(DataError, match=r"docs\.jsonl \(format 'text'\): the file is empty"):
        prepare.run(cfg)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs.jsonl"]  # nothing written


def test_convert_refuses_a_model_whose_generation_drops_its_cache(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run-time guard (retroloop.guards): with the looped model's forward ignoring the cache
    generate hands it (transformers 5.24's rename before the fix), convert fails with one line
    naming the check and the library versions, and writes nothing."""
    import functools

    from retroloop.envlock import lock_sha256
    from retroloop.errors import GuardError

    forward = RecurrentForCausalLM.forward

    @functools.wraps(forward)
    def forgetful(self, *args, cache=None, **kwargs):
        kwargs.pop("past_key_values", None)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(RecurrentForCausalLM, "forward", forgetful)
    out = workdir / "convert-guarded"
    with pytest.raises(GuardError, match=r"guard cached_generate failed .*transformers") as err:
        convert.run(load_params(TINY_PROFILE), out_dir=out)
    assert "\n" not in str(err.value)
    assert not out.exists() and not list(workdir.glob(".convert-guarded*"))
    manifest = read_manifest(STAGE_DIRS["convert"])  # the unbroken run's: guarded, lock recorded
    assert manifest.metrics["guard_cached_generate"]["steps"] > 0
    assert manifest.environment["lock_sha256"] == lock_sha256()


def _with_convert(cfg, **convert_updates):
    return cfg.model_copy(update={"convert": cfg.convert.model_copy(update=convert_updates)})


def test_convert_refuses_a_conversion_that_does_not_reproduce_its_source(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A conversion that misses something its source does outside the decoder layers (here the
    final norm's scale, as a family hook left out would) is one line naming the measured
    difference and `convert.equivalence_tolerance`, and nothing is written; the key is honoured
    (a tolerance above the difference publishes it, recorded in the manifest)."""
    from retroloop.errors import RetroloopError

    real = convert.convert_from_source

    def unfaithful(*args, **kwargs):
        looped = real(*args, **kwargs)
        with torch.no_grad():
            looped.model.norm.weight.mul_(1.5)
        return looped

    monkeypatch.setattr(convert, "convert_from_source", unfaithful)
    cfg = load_params(TINY_PROFILE)
    out = workdir / "convert-unfaithful"
    with pytest.raises(ModelError, match=r"max \|Δlogit\| = .* > convert\.equivalence_tolerance = 0\.001 \(float32\)") as err:  # fmt: skip
        convert.run(cfg, out_dir=out)
    assert isinstance(err.value, RetroloopError) and "\n" not in str(err.value)  # exit 2
    assert "'llama'" in str(err.value)
    assert not out.exists() and not list(workdir.glob(".convert-unfaithful*"))
    manifest = convert.run(_with_convert(cfg, equivalence_tolerance=1e3), out_dir=out)
    assert 1e-3 < manifest.metrics["equivalence_max_abs_diff"] <= 1e3
    assert manifest.params["convert"]["equivalence_tolerance"] == 1e3


def test_convert_loads_the_source_in_the_configured_dtype(workdir: Path) -> None:
    """`dtype: bfloat16`: the source loads, converts and is saved in bf16 (it was always fp32),
    and bf16's own tolerance applies."""
    cfg = load_params(TINY_PROFILE).model_copy(update={"dtype": "bfloat16"})
    out = workdir / "convert-bf16"
    manifest = convert.run(cfg, out_dir=out)
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    assert manifest.metrics["equivalence_max_abs_diff"] <= convert.EQUIVALENCE_TOLERANCE["bfloat16"]
    assert convert.EQUIVALENCE_TOLERANCE["float32"] < convert.EQUIVALENCE_TOLERANCE["bfloat16"]


def test_a_gemma3_tiny_profile_runs_prepare_analyze_convert_exactly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tiny profile with `architecture: gemma3_text` (the family with the most hooks: √h
    embedding scale, local/global layers with a rope each; 50 training steps): prepare accepts
    it, analyze scores its layers, and convert publishes a looped model equal to the
    layer-dropped source at R = 1 that loads with transformers after `import retroloop`."""
    monkeypatch.chdir(tmp_path)
    cfg = load_params(
        TINY_PROFILE,
        {"prepare.model.tiny.architecture": "gemma3_text", "prepare.model.tiny.train_steps": 50},
    )
    for stage in (prepare, analyze, convert):
        manifest = stage.run(cfg)
    assert manifest.metrics["equivalence_max_abs_diff"] <= 1e-5
    config = json.loads((tmp_path / "data/convert/model/config.json").read_text())
    assert config["source_model_type"] == "gemma3_text"
    assert config["embed_scale"] == pytest.approx(64**0.5)
    looped = AutoModelForCausalLM.from_pretrained(tmp_path / "data/convert/model").eval()
    source = load_model(tmp_path / "data/prepare/model")
    split = json.loads((tmp_path / "data/analyze/split.json").read_text())
    ids_B_T = torch.randint(5, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    mask_B_T = torch.ones_like(ids_B_T)
    reference = drop_layers(source, split["prelude"] + split["block"] + split["coda"])
    assert equivalence_max_abs_diff(looped, reference, ids_B_T, mask_B_T) <= 1e-5


def test_the_guards_size_is_the_params(workdir: Path) -> None:
    """`guards.*` set how many prompts, prompt tokens and generated tokens convert's cached-vs-
    cache-free check uses (they were literals: 3, 16 and 8). Greedy steps stop early only at
    an EOS, so a step count is at most prompts x new_tokens."""
    default = read_manifest(workdir / "data/convert").metrics["guard_cached_generate"]
    assert default["prompts"] == 2 and 3 < default["steps"] <= 2 * 8  # tiny holds 2 out
    cfg = load_params(TINY_PROFILE, {"guards.prompts": 1, "guards.new_tokens": 3})
    guard = convert.run(cfg, out_dir=workdir / "convert-guards").metrics["guard_cached_generate"]
    assert guard["prompts"] == 1 and guard["steps"] <= 3
