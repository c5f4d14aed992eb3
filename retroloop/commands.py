"""What each `retroloop` subcommand does; `retroloop.cli` parses the arguments, calls one of
these and turns its failures into one line and an exit code.

A command returns its exit code (0, or 1 when `verify` / `audit` found a problem) and raises
`RetroloopError` for a mistake the user can fix. The orchestration commands (run, cycle,
schedule) import `flows/` lazily: the core package itself never imports Prefect.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from retroloop import launch
from retroloop.config import Params, load_params
from retroloop.errors import ConfigError, ModelError

log = logging.getLogger("retroloop")


def _overrides(pairs: list[str]) -> dict:
    import yaml

    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {pair!r}: expected KEY=VALUE, e.g. distill.steps=10")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            first = str(err).splitlines()[0]
            raise ConfigError(f"--set {pair}: VALUE is not valid YAML ({first})") from None
    return out


@contextlib.contextmanager
def _params(args: argparse.Namespace) -> Iterator[tuple[Path, Params]]:
    """(params file, validated params) for a command that hands a *path* to a flow or a
    benchmark. With `--set`, the file is a temporary copy holding the merged, validated
    values (removed when the command ends); without, it is `--params` itself."""
    overrides = _overrides(args.set)
    cfg = load_params(args.params, overrides)  # fails here, before Prefect or torch start
    if not overrides:
        yield args.params, cfg
        return
    import yaml

    with tempfile.TemporaryDirectory(prefix="retroloop-params-") as tmp:
        path = Path(tmp) / "params.yaml"
        path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        log.info("params: %s with --set %s (in %s)", args.params, ", ".join(args.set), path)
        yield path, cfg


# --------------------------------------------------------------------------- commands


def cmd_stage(args: argparse.Namespace) -> int:
    cfg = load_params(args.params, _overrides(args.set))
    if args.set:
        log.warning(
            "--set %s: DVC does not see it (dvc.lock keeps %s's values); to record an override "
            "use `dvc exp run -S KEY=VALUE`",
            " ".join(args.set),
            args.params,
        )
    manifest = launch.run_stage(args.name, cfg, args.params, tuple(args.set or ()))
    print(
        json.dumps(
            {
                "stage": manifest.stage,
                "content_sha256": manifest.content_sha256,
                "metrics": manifest.metrics,
            },
            indent=2,
            default=str,
        )
    )
    return 0


def check_dvc_idle(root: Path = Path(".")) -> None:
    """`BusyError` at once, naming the holder, when a DVC command (`dvc repro`, `dvc exp run`)
    holds this repository's lock, `.dvc/tmp/lock`: the pipeline flow would fail on its first
    DVC call, after Prefect has started. DVC locks it with `flock` (zc.lockfile), so a free
    lock is taken and given back here in one step; a dead holder's lock is free."""
    import os

    from retroloop.errors import BusyError
    from retroloop.runlock import dvc_lock_holder, try_flock

    path = Path(root) / ".dvc" / "tmp" / "lock"
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # no lock file: nothing holds it
    try:
        if not try_flock(fd):
            raise BusyError(
                f"retroloop run: another DVC command is running in this repository: "
                f"{dvc_lock_holder(Path(root))}; wait for it to finish, then run again"
            )
    finally:
        os.close(fd)  # releases the lock if this took it


def cmd_run(args: argparse.Namespace) -> int:
    check_dvc_idle()  # before the params, Prefect and torch: one line, at once
    with _params(args) as (params_path, _cfg):
        from flows.pipeline import pipeline_flow

        result = pipeline_flow(params_path=str(params_path), force=args.force)
    print(json.dumps(result, default=str))  # one line: the last line of stdout
    return 0


def cmd_cycle(args: argparse.Namespace) -> int:
    with _params(args) as (params_path, _cfg):
        from retroloop.cycle import load_domain_file

        # A missing or malformed domain file is one line here, not a failed flow run.
        load_domain_file(args.domain_data, args.format)
        from flows.cycle import cycle_flow

        result = cycle_flow(
            domain_data=str(args.domain_data), params_path=str(params_path), fmt=args.format
        )
    print(json.dumps(result, indent=2, default=str))
    return 0


def cmd_schedule(args: argparse.Namespace) -> int:
    if args.remote:
        return _schedule_remote(args)
    with _params(args) as (params_path, _cfg):
        from flows.cycle import serve_schedule

        serve_schedule(
            cron=args.cron,
            params_path=str(params_path),
            watch_dir=args.watch_dir,
            name=args.name or "retroloop-cycle",
        )
    return 0


def _schedule_remote(args: argparse.Namespace) -> int:
    """`schedule --remote`: register the deployment on the Prefect server and return (its
    workers run it); every refusal is one line before anything is registered."""
    from retroloop.errors import ConfigError

    if args.set:
        raise ConfigError(
            f"--set {' '.join(args.set)} with --remote: the worker reads {args.params} from its "
            "clone of the pushed commit; commit and push the change instead"
        )
    if args.params.is_absolute():
        raise ConfigError(
            f"--params {args.params} with --remote: give the path inside the repository "
            "(the worker's clone), e.g. params.yaml"
        )
    from tasks.remote import deployable_commit

    deployable_commit("origin")  # HEAD on origin: what the worker clones
    load_params(args.params)  # a broken params file fails here, not on the worker
    from flows.cycle import deploy_remote_schedule

    deployment_id, commit = deploy_remote_schedule(
        args.cron, params_path=args.params.as_posix(), watch_dir=args.watch_dir,
        name=args.name or "retroloop-cycle-remote", pool=args.pool,
    )  # fmt: skip
    print(json.dumps({"deployment": deployment_id, "commit": commit, "pool": args.pool}))
    return 0


def cmd_lineage(args: argparse.Namespace) -> int:
    from retroloop.provenance import lineage

    tree = lineage(args.artifact)  # a missing path is an ArtifactError: one line, exit 2
    if args.json:
        print(json.dumps(tree, indent=2))
        return 0
    from rich.console import Console
    from rich.tree import Tree

    def add(node: dict, branch: Tree) -> None:
        label = f"[bold]{node['role']}[/] {node['path']} [dim]{node.get('kind', '')}/{node.get('stage', '')} sha256:{(node.get('content_sha256') or '')[:12]}[/]"
        child = branch.add(label)
        if isinstance(node.get("inputs"), list):
            for sub in node["inputs"]:
                add(sub, child)

    root = Tree(f"lineage of {args.artifact}")
    add(tree, root)
    Console().print(root)
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    from retroloop.provenance import audit

    rows = audit(args.root)
    bad = any(row["status"] != "OK" for row in rows)
    if args.json:  # the same exit status as the table: a script sees BAD without parsing
        print(json.dumps(rows, indent=2))
        return 1 if bad else 0
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console()
    header = ("status", "adapter", "stage", "teacher", "teacher sha256", "lock sha256", "compute",
              "created")  # fmt: skip
    cells = []
    for row in rows:
        teacher = row["teacher"] or {}
        # The same params, code and lock give the same hashes on the same device and CPU kernel
        # level (README, lineage): that pair is what a user compares across machines.
        compute = " ".join(x for x in (row.get("device"), row.get("cpu_capability")) if x) or "-"
        cells.append((
            row["status"], row["adapter"], row["stage"], teacher.get("path", "-"),
            (teacher.get("content_sha256") or "-")[:12], (row["lock_sha256"] or "-")[:12],
            compute, row["created"] or (row.get("error") or "-"),
        ))  # fmt: skip
    # Paths are what a user copies into `lineage` / `generate`: never cut, folded or wrapped.
    # A table when it fits the terminal; else one block per adapter, each path on its own line.
    # (The last column, a timestamp or a problem in prose, may wrap.)
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(header[:-1])]
    if sum(widths) + len("2026-11-29T12:00:00+00:00") + 3 * len(header) + 1 <= console.width:
        table = Table(title=f"adapters under {args.root}")
        for col in header:
            table.add_column(col, no_wrap=col != "created", overflow="fold")
        for c in cells:
            table.add_row(*c)
        console.print(table)
    else:
        console.print(f"adapters under {escape(str(args.root))}", style="bold")
        for status, adapter, stage, teacher, teacher_sha, lock_sha, compute, created in cells:
            lines = [f"{status:<4} {adapter}  ({stage})", f"     teacher  {teacher}",
                     f"     teacher sha256 {teacher_sha}  lock sha256 {lock_sha}  on {compute}",
                     f"     {'created' if status == 'OK' else 'problem'}  {created}"]  # fmt: skip
            for line in lines:
                console.print(escape(line), soft_wrap=True, highlight=False)
    return 1 if bad else 0


def cmd_verify(args: argparse.Namespace) -> int:
    from retroloop.errors import ArtifactError
    from retroloop.provenance import find_artifacts, verify

    if args.artifact and not args.artifact.exists():
        raise ArtifactError(f"{args.artifact}: no such artifact; give a path under data/")
    # Every manifest under the root, unreadable ones included (verify reports them as BAD).
    targets = [args.artifact] if args.artifact else [f.dir for f in find_artifacts(args.root)]
    if not targets:
        print(f"no artifacts under {args.root}")
    bad = 0
    for target in targets:
        problems = verify(target)
        print(f"{'OK ' if not problems else 'BAD'} {target}")
        for line in problems:
            print(f"    {line}")
        bad += bool(problems)
    return 1 if bad else 0


def cmd_export(args: argparse.Namespace) -> int:
    from retroloop.export import export

    manifest = export(args.adapter, args.out)
    print(json.dumps({"export": str(args.out), "content_sha256": manifest.content_sha256}))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import torch
    from transformers import TextStreamer

    from retroloop.models.loading import load_adapter, load_model, load_tokenizer, read_model_config
    from retroloop.models.recurrent import RecurrentConfig
    from retroloop.sequences import render_chat

    model_type = read_model_config(args.model)["model_type"]  # before loading any weights
    if args.recurrence is not None and model_type != RecurrentConfig.model_type:
        raise ModelError(
            f"--recurrence {args.recurrence}: {args.model} is not a looped model (model_type "
            f"{model_type!r}, it always runs its layers once); drop --recurrence, or give a "
            "converted model such as data/convert/model"
        )
    model = load_model(args.model)
    tokenizer = load_tokenizer(args.model)
    if args.adapter:
        model = load_adapter(model, args.adapter).eval()
    text = render_chat(tokenizer, args.prompt) if not args.raw else args.prompt
    enc = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    kwargs = {"num_recurrence": args.recurrence} if args.recurrence is not None else {}
    # Tokens go to stdout as they are produced; the timing goes to stderr.
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            **enc,
            max_new_tokens=args.max_new_tokens,
            do_sample=args.temperature > 0,
            temperature=args.temperature or None,
            top_p=None,
            top_k=None,
            pad_token_id=tokenizer.pad_token_id,
            streamer=streamer,
            **kwargs,
        )
    seconds = time.perf_counter() - started
    n_new = out.shape[1] - enc["input_ids"].shape[1]
    print(
        f"{n_new} tokens in {seconds:.2f} s: {n_new / max(seconds, 1e-9):.1f} tokens/s",
        file=sys.stderr,
    )
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    module = importlib.import_module(f"benchmarks.bench_{args.name}")
    with _params(args) as (params_path, _cfg):
        result = module.main(params_path=params_path, quick=args.quick)
    if args.json:
        print(json.dumps(result, default=str))
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"bench {args.name}")
        table.add_column("metric", overflow="fold")
        table.add_column("value", overflow="fold")
        for key, value in result.items():
            table.add_row(
                key,
                json.dumps(value, default=str) if isinstance(value, dict | list) else f"{value}",
            )
        Console().print(table)
    return 0
