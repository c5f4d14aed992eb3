"""Each stage reads only the parameters its `dvc.yaml` entry declares.

DVC reruns a stage when a declared parameter changes and only then: a key the stage reads but
does not declare can change its output while `dvc repro` calls it current (evaluate read
`prepare.max_seq_len` undeclared until issue 22). The test reruns every stage of the session's
tiny build in process with every read of the parameters recorded (a field read on any section,
or a whole section dumped, e.g. into a manifest), and compares the reads with the stage's
`params:` list (a declared section covers its keys).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from retroloop.config import STAGES, Params, Strict, load_params
from tests.e2e.conftest import Built, clone_built

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]

# Keys no output depends on, so no stage declares them: where the run happens and how fast
# (the manifest records device and threads as environment), and where per-step metrics are
# also streamed (logging.sink/dir/experiment: TensorBoard or MLflow, outside every artifact).
NOT_OUTPUT_KEYS = ("device", "threads", "logging.sink", "logging.dir", "logging.experiment")
# Reads that can only refuse a run, never change its output: prepare checks the later stages'
# sequence lengths against the source model's context before its long work. Declaring them
# would rerun prepare (the teacher's training) whenever analyze's or the cycle's length moves.
CHECKED_ONLY = {"prepare": ("analyze.max_seq_len", "cycle.max_seq_len")}


def declared(stage: str) -> list[str]:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"][stage]["params"]


def covered(key: str, keys: list[str] | tuple[str, ...]) -> bool:
    """`key` is one of `keys` or inside a section one of them names."""
    return any(key == k or key.startswith(k + ".") for k in keys)


def _sections(model: Strict, path: str) -> Iterator[tuple[int, str]]:
    yield id(model), path
    for name in type(model).model_fields:
        child = model.__dict__[name]
        if isinstance(child, Strict):
            yield from _sections(child, f"{path}.{name}" if path else name)


@contextmanager
def recording(cfg: Params) -> Iterator[set[str]]:
    """Every parameter `cfg` gives out while the block runs, as dotted keys: a field read on
    any of its sections (`distill.lora.r`; reading a section itself is only navigation), or a
    whole section when it is dumped (`model_dump`, as `Params.section` does for the manifest)."""
    where = dict(_sections(cfg, ""))  # id(section) -> its dotted path ("" = the root)
    reads: set[str] = set()
    get, dump, dump_json = Strict.__getattribute__, Strict.model_dump, Strict.model_dump_json

    def join(model: Strict, name: str = "") -> str:
        return ".".join(p for p in (where[id(model)], name) if p)

    def getattribute(self, name):
        value = get(self, name)
        if id(self) in where and name in type(self).model_fields and not isinstance(value, Strict):
            reads.add(join(self, name))
        return value

    def whole(fn):
        def wrapper(self, *args, **kwargs):
            path = where.get(id(self))
            if path == "":  # the whole params: every top-level key
                reads.update(type(self).model_fields)
            elif path is not None:
                reads.add(path)
            return fn(self, *args, **kwargs)

        return wrapper

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Strict, "__getattribute__", getattribute)
        mp.setattr(Strict, "model_dump", whole(dump))
        mp.setattr(Strict, "model_dump_json", whole(dump_json))
        yield reads


def undeclared(reads: set[str], stage: str) -> list[str]:
    keys = [*declared(stage), *NOT_OUTPUT_KEYS, *CHECKED_ONLY.get(stage, ())]
    return sorted(r for r in reads if not covered(r, keys))


def test_the_recorder_sees_field_reads_and_dumps_and_tells_declared_from_not() -> None:
    """The check can fail: a read outside the declared list is reported, one inside is not."""
    cfg = load_params(REPO / "profiles" / "tiny.yaml")
    with recording(cfg) as reads:
        _ = cfg.seed, cfg.distill.lora.r, cfg.prepare.max_seq_len, cfg.device
        cfg.section("evaluate")
    assert {"seed", "distill.lora.r", "prepare.max_seq_len", "evaluate", "device"} <= reads
    assert "distill" not in reads and "distill.lr" not in reads  # navigation is not a read
    assert undeclared({"distill.lora.r", "seed", "device"}, "distill") == []
    assert undeclared({"prepare.max_seq_len", "opd.lr"}, "analyze") == ["opd.lr"]


@pytest.fixture(scope="module")
def reads_per_stage(tiny_built: Built, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Each stage rerun in order on a copy of the tiny build, its parameter reads recorded."""
    import torch

    root = clone_built(tiny_built, tmp_path_factory.mktemp("params_read") / "repo")
    out, threads = {}, torch.get_num_threads()  # a stage sets `threads` for the whole process
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        try:
            for stage in STAGES:
                cfg = load_params(root / "params.yaml")
                run = importlib.import_module(f"retroloop.stages.{stage}").run
                with recording(cfg) as reads:
                    run(cfg)
                out[stage] = reads
        finally:
            torch.set_num_threads(threads)
    return out


@pytest.mark.parametrize("stage", STAGES)
def test_a_stage_reads_only_the_params_dvc_yaml_declares(stage: str, reads_per_stage) -> None:
    reads = reads_per_stage[stage]
    assert reads, f"{stage}: no parameter read recorded (the recorder is broken)"
    missing = undeclared(reads, stage)
    assert not missing, (
        f"dvc.yaml stage {stage}: reads {missing} but its params: list does not declare them, "
        "so changing them does not rerun it; add them to its params:"
    )
