"""Every bad input of issue 14 ends in one line `error: …` that names the key, file or value,
exit code 2, and nothing half-written; no path runs code shipped in a model directory.

Most rows call `retroloop.cli.main` in-process on the tiny profile and fail before any model
work; disk-full, Ctrl-C and the remote-code cases run `retroloop` as a subprocess (a file-size
limit, a signal and a "y" on stdin act on a process).
"""

from __future__ import annotations

import functools
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from retroloop.cli import main
from tests.conftest import TINY_PROFILE

pytestmark = pytest.mark.usefixtures("one_thread")


def error_line(err: str, *needles: str) -> str:
    """The one `error:` line, which must be the last line of stderr, with no traceback."""
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def cli(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err


def tiny_params(path: Path, **sections) -> Path:
    """The tiny profile with some sections' keys replaced, written to `path`."""
    raw = yaml.safe_load(TINY_PROFILE.read_text())
    for section, values in sections.items():
        for dotted, value in values.items():
            node = raw[section]
            *parents, leaf = dotted.split(".")
            for key in parents:
                node = node[key]
            node[leaf] = value
    path.write_text(yaml.safe_dump(raw))
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer Llama with a BPE tokenizer trained in code, saved with save_pretrained."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from retroloop.models.loading import build_tiny_tokenizer

    out = tmp_path_factory.mktemp("model") / "tiny"
    tokenizer = build_tiny_tokenizer(["the quick brown fox jumps over the lazy dog"] * 20, 300)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
        tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture
def no_cycle_flow(monkeypatch):
    """Importing the Prefect cycle flow fails: an error must come before the flow starts."""
    monkeypatch.setitem(sys.modules, "flows.cycle", None)


# --------------------------------------------------------------------------- params


def test_set_into_a_value(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    code, err = cli(capsys, "stage", "prepare", "--params", str(TINY_PROFILE), "--set", "seed.x=1")
    assert code == 2
    error_line(err, "--set seed.x", "seed is a value", "set seed=VALUE")
    assert not (tmp_path / "data").exists()


def test_recurrence_scaling_below_one_is_rejected_by_the_schema(tmp_path, monkeypatch, capsys):
    params = tiny_params(tmp_path / "p.yaml", evaluate={"recurrence_scaling": [0, -1]})
    monkeypatch.chdir(tmp_path)
    code, err = cli(capsys, "stage", "evaluate", "--params", str(params))
    assert code == 2
    error_line(err, "evaluate.recurrence_scaling.0", "greater than or equal to 1", "(got 0)")
    assert not (tmp_path / "data").exists()


# --------------------------------------------------------------------------- data


def test_chat_messages_that_are_not_objects(tmp_path, monkeypatch, capsys, no_cycle_flow):
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": ["hi"]}])
    monkeypatch.chdir(tmp_path)
    code, err = cli(capsys, "cycle", "--params", str(TINY_PROFILE), "--domain-data", str(data),
                    "--format", "chat")  # fmt: skip
    assert code == 2
    error_line(err, str(data), "record 1", "'messages'[0] is 'hi'", '"role"', "fix that record")


def test_ifeval_kwargs_that_are_not_objects(tmp_path, monkeypatch, capsys) -> None:
    data = write_jsonl(
        tmp_path / "ifeval.jsonl",
        [{"key": 1, "prompt": "Write 3 lines.", "instruction_id_list": ["x:y"], "kwargs": [5]}],
    )
    params = tiny_params(
        tmp_path / "p.yaml",
        prepare={"instructions": {"source": "local", "path": str(data), "format": "ifeval"}},
    )
    monkeypatch.chdir(tmp_path)
    code, err = cli(capsys, "stage", "prepare", "--params", str(params))
    assert code == 2
    error_line(err, str(data), "record 1", "'kwargs'[0] is 5", "fix that record")
    assert not (tmp_path / "data" / "prepare").exists()


def test_cycle_with_missing_domain_data(tmp_path, monkeypatch, capsys, no_cycle_flow) -> None:
    monkeypatch.chdir(tmp_path)
    code, err = cli(
        capsys, "cycle", "--params", str(TINY_PROFILE), "--domain-data", "missing.jsonl"
    )
    assert code == 2
    line = error_line(err, "--domain-data missing.jsonl", "no such file")
    assert "builtin" not in line  # the hint of a params key, not of this command


# --------------------------------------------------------------------------- models


def test_model_config_without_model_type(tmp_path, capsys) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    code, err = cli(capsys, "generate", "--model", str(model), "hi")
    assert code == 2
    error_line(err, str(model / "config.json"), "no 'model_type'", "save_pretrained")


def test_truncated_safetensors(tmp_path, tiny_model_dir, capsys) -> None:
    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    code, err = cli(capsys, "generate", "--model", str(model), "hi")
    assert code == 2
    error_line(err, str(model), "does not load", "SafetensorError", "truncated")


def test_generate_with_a_missing_adapter(tmp_path, tiny_model_dir, capsys) -> None:
    missing = tmp_path / "no-adapter"
    code, err = cli(
        capsys, "generate", "--model", str(tiny_model_dir), "--adapter", str(missing), "hi"
    )
    assert code == 2
    error_line(err, str(missing), "does not exist", "PEFT adapter directory")


def test_generate_with_an_adapter(tmp_path, tiny_model_dir, capsys) -> None:
    """The good case beside the missing adapter: a real LoRA directory loads and generates."""
    from peft import LoraConfig, get_peft_model

    from retroloop.models.loading import load_model

    adapter = tmp_path / "adapter"
    lora = LoraConfig(r=2, target_modules="all-linear")
    get_peft_model(load_model(tiny_model_dir), lora).save_pretrained(adapter)
    code = main(["generate", "--model", str(tiny_model_dir), "--adapter", str(adapter),
                 "--max-new-tokens", "2", "hi"])  # fmt: skip
    assert code == 0, capsys.readouterr().err


def test_generate_recurrence_below_one(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--model", "data/convert/model", "--recurrence", "0", "hi"])
    assert exc.value.code == 2
    error_line(capsys.readouterr().err, "--recurrence", "0 must be >= 1")


def test_generate_recurrence_on_a_model_that_does_not_loop(tiny_model_dir, capsys) -> None:
    code, err = cli(capsys, "generate", "--model", str(tiny_model_dir), "--recurrence", "2", "hi")
    assert code == 2
    error_line(err, "--recurrence 2", str(tiny_model_dir), "not a looped model", "'llama'")


def test_generate_recurrence_reaches_a_looped_model(tmp_path, tiny_model_dir, capsys, monkeypatch):
    """The good case beside the rejected ones: every forward of a looped model gets R
    (the old `if args.recurrence` dropped it silently for R=0)."""
    from retroloop.models.loading import load_model, load_tokenizer
    from retroloop.models.recurrent import RecurrentForCausalLM, convert_from_source

    looped = tmp_path / "looped"
    model = convert_from_source(load_model(tiny_model_dir), prelude=[], block=[0], coda=[1])
    model.save_pretrained(looped)
    load_tokenizer(tiny_model_dir).save_pretrained(looped)
    seen: list[int | None] = []
    forward = RecurrentForCausalLM.forward

    @functools.wraps(forward)  # generate() checks its kwargs against forward's signature
    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("num_recurrence"))
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(RecurrentForCausalLM, "forward", spy)
    code = main(["generate", "--model", str(looped), "--recurrence", "3", "--raw",
                 "--max-new-tokens", "4", "the quick brown"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert seen and set(seen) == {3}


def test_generate_streams_and_reports_tokens_per_second(tiny_model_dir, capsys, monkeypatch):
    import transformers

    calls: list[tuple[str, bool]] = []
    real = transformers.TextStreamer.on_finalized_text

    def spy(self, text: str, stream_end: bool = False) -> None:
        calls.append((text, stream_end))
        real(self, text, stream_end)

    monkeypatch.setattr(transformers.TextStreamer, "on_finalized_text", spy)
    code = main(["generate", "--model", str(tiny_model_dir), "--raw", "--max-new-tokens", "6",
                 "--temperature", "1.0", "the quick"])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0
    # Every new token is handed to stdout as it is produced (TextStreamer holds back only an
    # unfinished word); the reply is on stdout and nothing else is.
    timing = re.fullmatch(
        r"(\d+) tokens in [\d.]+ s: [\d.]+ tokens/s", err.strip().splitlines()[-1]
    )
    assert timing and 1 <= int(timing[1]) <= 6
    assert sum(not end for _, end in calls) == int(timing[1]) and calls[-1][1]
    assert out == "".join(text for text, _ in calls) + "\n"


# --------------------------------------------------------------------------- files, disk, signals


def test_checkpoints_folder_is_a_file(tmp_path, monkeypatch, capsys) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "checkpoints").write_text("not a folder")
    monkeypatch.chdir(tmp_path)
    code, err = cli(capsys, "stage", "cache_teacher", "--params", str(TINY_PROFILE))
    assert code == 2
    error_line(err, "data/checkpoints: is a file", "move or delete")


def test_any_file_in_the_way_is_named(tmp_path, monkeypatch, capsys) -> None:
    """Beyond the folders stages check up front: an OSError anywhere names the blocking path."""
    import retroloop.provenance

    (tmp_path / "registry").write_text("a file")
    monkeypatch.setattr(
        retroloop.provenance, "audit", lambda root: (Path(root) / "cycles").mkdir(parents=True)
    )
    code, err = cli(capsys, "audit", "--root", str(tmp_path / "registry" / "sub"))
    assert code == 2
    error_line(err, f"{tmp_path / 'registry'}: is a file where a folder is needed", "move")


def _cheap_prepare_params(path: Path, **teacher_responses) -> Path:
    """Prepare on an untrained tiny model with few records: seconds, a ~1.3 MB safetensors."""
    return tiny_params(
        path,
        prepare={
            "model.tiny.train_steps": 0,
            "domain.max_records": 8,
            "instructions.max_records": 8,
            **{f"teacher_responses.{k}": v for k, v in teacher_responses.items()},
        },
    )


def _retroloop(*argv: str) -> list[str]:
    return [sys.executable, "-m", "retroloop.cli", *argv]


def _leftovers(data: Path) -> list[str]:
    return sorted(p.name for p in data.glob(".*tmp*")) if data.is_dir() else []


def test_disk_full_while_writing(tmp_path) -> None:
    params = _cheap_prepare_params(tmp_path / "p.yaml", max_new_tokens=2)
    limit = 256 * 1024  # the parquet files fit, the model's safetensors (~1.3 MB) does not

    def cap_file_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = subprocess.run(
        _retroloop("stage", "prepare", "--params", str(params)),
        cwd=tmp_path, capture_output=True, text=True, preexec_fn=cap_file_size, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    error_line(proc.stderr, "data/prepare: cannot write (File too large)", "ulimit -f")
    assert not (tmp_path / "data" / "prepare").exists()
    assert _leftovers(tmp_path / "data") == []


def test_ctrl_c_during_a_stage(tmp_path) -> None:
    # Long teacher replies keep prepare busy inside its atomic output for several seconds.
    params = _cheap_prepare_params(tmp_path / "p.yaml", max_new_tokens=400, batch_size=1)
    proc = subprocess.Popen(
        _retroloop("stage", "prepare", "--params", str(params)),
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 240
    while not _leftovers(tmp_path / "data") and proc.poll() is None:
        assert time.monotonic() < deadline, "prepare never started writing"
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    error_line(err, "interrupted", "rerun")
    assert not (tmp_path / "data" / "prepare").exists()
    assert _leftovers(tmp_path / "data") == []


# --------------------------------------------------------------------------- unexpected errors


def test_unexpected_error_is_one_line_and_debug_shows_the_traceback(monkeypatch, capsys):
    import retroloop.provenance

    def boom(root):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(retroloop.provenance, "audit", boom)
    code, err = cli(capsys, "audit")
    assert code == 1
    error_line(err, "RuntimeError: boom", "--debug")
    code, err = cli(capsys, "--debug", "audit")
    assert code == 1 and "Traceback" in err and err.strip().splitlines()[-1].startswith("error:")
    monkeypatch.setenv("RETROLOOP_DEBUG", "1")
    code, err = cli(capsys, "audit")
    assert code == 1 and "Traceback" in err


# --------------------------------------------------------------------------- remote code


EVIL = "open({marker!r}, 'w').write('ran')\n"


def _evil_model_dir(root: Path, marker: Path) -> Path:
    """A model directory whose config asks for its own code; importing that code writes `marker`."""
    model = root / "evil-model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({
        "model_type": "evil",
        "architectures": ["EvilForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_evil.EvilConfig",
                     "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"},
    }))  # fmt: skip
    (model / "configuration_evil.py").write_text(
        EVIL.format(marker=str(marker)) + "from transformers import PretrainedConfig\n"
        "class EvilConfig(PretrainedConfig):\n    model_type = 'evil'\n"
    )
    (model / "modeling_evil.py").write_text(EVIL.format(marker=str(marker)))
    return model


def _evil_tokenizer_dir(root: Path, base: Path, marker: Path) -> Path:
    """A loadable Llama whose tokenizer_config asks for its own tokenizer code."""
    model = shutil.copytree(base, root / "evil-tokenizer")
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
    config["tokenizer_class"] = "EvilTokenizer"
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    (model / "tokenization_evil.py").write_text(
        EVIL.format(marker=str(marker)) + "from transformers import PreTrainedTokenizerFast\n"
        "class EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n"
    )
    return model


@pytest.mark.parametrize("part", ["model", "tokenizer"])
def test_no_code_from_a_model_directory_runs(part, tmp_path, tiny_model_dir) -> None:
    from transformers import AutoConfig, AutoTokenizer

    def build(root: Path, marker: Path) -> Path:
        root.mkdir()
        if part == "model":
            return _evil_model_dir(root, marker)
        return _evil_tokenizer_dir(root, tiny_model_dir, marker)

    # The control: the directory's code is real and runs when code is trusted.
    control_marker = tmp_path / "control-ran"
    control = build(tmp_path / "control", control_marker)
    load = AutoConfig if part == "model" else AutoTokenizer
    load.from_pretrained(control, trust_remote_code=True)
    assert control_marker.exists()

    marker = tmp_path / "ran"
    model = build(tmp_path / "case", marker)
    proc = subprocess.run(
        _retroloop("generate", "--model", str(model), "hi"),
        input="y\n", capture_output=True, text=True, timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert not marker.exists()
    assert proc.returncode == 2, proc.stderr
    error_line(proc.stderr, str(model), "auto_map", "never")


# --------------------------------------------------------------------------- interfaces


AUDIT_ROWS = [
    {"status": "OK", "adapter": "data/registry/cycles/cycle-0012/adapter", "stage": "cycle",
     "teacher": {"path": "data/registry/cycles/cycle-0011/model", "content_sha256": "ab" * 32},
     "lock_sha256": "cd" * 32, "device": "cpu", "cpu_capability": "AVX2",
     "created": "2026-11-29T12:00:00+00:00"},
    {"status": "BAD", "adapter": "data/opd/adapter", "stage": "opd", "teacher": None,
     "lock_sha256": None, "created": None, "error": "data/opd/manifest.json: edited"},
]  # fmt: skip


@pytest.mark.parametrize("columns", [80, 200])
def test_audit_never_cuts_a_path(columns, monkeypatch, capsys) -> None:
    import retroloop.provenance

    monkeypatch.setattr(retroloop.provenance, "audit", lambda root: AUDIT_ROWS)
    monkeypatch.setenv("COLUMNS", str(columns))
    assert main(["audit"]) == 1  # one adapter is BAD
    out = capsys.readouterr().out
    words = out.replace("│", " ").split()
    for path in (
        "data/registry/cycles/cycle-0012/adapter",
        "data/registry/cycles/cycle-0011/model",
    ):
        assert path in words, out  # whole, on one line
    assert "…" not in out and max(len(line) for line in out.splitlines()) <= columns
    # The compute each adapter was trained on: hashes agree only on the same kernel level.
    assert "AVX2" in words, out


def test_set_reaches_a_flow_through_a_validated_params_file(tmp_path, monkeypatch) -> None:
    """`cycle --set` hands the flow a params file with the merged values, removed afterwards."""
    import types

    from retroloop.config import load_params

    seen = {}

    def fake_cycle_flow(domain_data, params_path, fmt):
        seen["cfg"], seen["path"] = load_params(params_path), Path(params_path)
        return {"cycle": 1}

    monkeypatch.setitem(
        sys.modules, "flows.cycle", types.SimpleNamespace(cycle_flow=fake_cycle_flow)
    )
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "one document"}, {"text": "another one"}])
    code = main(["cycle", "--params", str(TINY_PROFILE), "--domain-data", str(data),
                 "--set", "cycle.midtrain_steps=7", "--set", "distill.lora.r=3"])  # fmt: skip
    assert code == 0
    want = load_params(TINY_PROFILE, {"cycle.midtrain_steps": 7, "distill.lora.r": 3})
    assert seen["cfg"] == want and seen["cfg"] != load_params(TINY_PROFILE)
    assert not seen["path"].exists()
