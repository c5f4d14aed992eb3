"""The `retroloop` command. `retroloop --help` and `retroloop COMMAND --help` describe each.

Errors a user can fix (`RetroloopError`) print one line and exit 2; nothing else is caught.
The orchestration commands (run, cycle, schedule) import `flows/` lazily: the core
package itself never imports Prefect.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
from pathlib import Path

from retroloop.config import STAGES, load_params
from retroloop.errors import RetroloopError

log = logging.getLogger("retroloop")


def _setup_logging(verbose: bool) -> None:
    from rich.console import Console
    from rich.logging import RichHandler

    # Logs go to stderr so `--json` output on stdout stays machine-readable.
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[
            RichHandler(console=Console(stderr=True), show_path=False, rich_tracebacks=False)
        ],
    )
    for noisy in ("httpx", "urllib3", "filelock", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _overrides(pairs: list[str]) -> dict:
    import yaml

    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise RetroloopError(f"--set {pair!r}: expected KEY=VALUE, e.g. distill.steps=10")
        key, value = pair.split("=", 1)
        out[key] = yaml.safe_load(value)
    return out


# --------------------------------------------------------------------------- commands


def cmd_stage(args: argparse.Namespace) -> int:
    cfg = load_params(args.params, _overrides(args.set))
    module = importlib.import_module(f"retroloop.stages.{args.name}")
    manifest = module.run(cfg)
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


def cmd_run(args: argparse.Namespace) -> int:
    load_params(args.params)  # fail fast, before Prefect starts
    from flows.pipeline import pipeline_flow

    result = pipeline_flow(params_path=str(args.params), force=args.force)
    print(json.dumps(result, default=str))  # one line: the last line of stdout
    return 0


def cmd_cycle(args: argparse.Namespace) -> int:
    cfg = load_params(args.params)
    from flows.cycle import cycle_flow

    result = cycle_flow(
        domain_data=str(args.domain_data), params_path=str(args.params), fmt=args.format
    )
    del cfg
    print(json.dumps(result, indent=2, default=str))
    return 0


def cmd_schedule(args: argparse.Namespace) -> int:
    load_params(args.params)
    from flows.cycle import serve_schedule

    serve_schedule(
        cron=args.cron, params_path=str(args.params), watch_dir=args.watch_dir, name=args.name
    )
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
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"adapters under {args.root}")
    for col in (
        "status",
        "adapter",
        "stage",
        "teacher",
        "teacher sha256",
        "lock sha256",
        "created",
    ):
        table.add_column(col)
    for row in rows:
        teacher = row["teacher"] or {}
        table.add_row(
            row["status"],
            row["adapter"],
            row["stage"],
            teacher.get("path", "-"),
            (teacher.get("content_sha256") or "-")[:12],
            (row["lock_sha256"] or "-")[:12],
            row["created"] or (row.get("error") or "-"),
        )
    Console().print(table)
    return 1 if any(row["status"] != "OK" for row in rows) else 0


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

    from retroloop.models.loading import load_model, load_tokenizer
    from retroloop.sequences import render_chat

    model = load_model(args.model)
    tokenizer = load_tokenizer(args.model)
    if args.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, args.adapter).eval()
    text = render_chat(tokenizer, args.prompt) if not args.raw else args.prompt
    enc = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    kwargs = {"num_recurrence": args.recurrence} if args.recurrence else {}
    torch.manual_seed(args.seed)
    with torch.no_grad():
        out = model.generate(
            **enc,
            max_new_tokens=args.max_new_tokens,
            do_sample=args.temperature > 0,
            temperature=args.temperature or None,
            top_p=None,
            top_k=None,
            pad_token_id=tokenizer.pad_token_id,
            **kwargs,
        )
    print(tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    module = importlib.import_module(f"benchmarks.bench_{args.name}")
    result = module.main(params_path=args.params, quick=args.quick)
    if args.json:
        print(json.dumps(result, default=str))
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"bench {args.name}")
        table.add_column("metric")
        table.add_column("value")
        for key, value in result.items():
            table.add_row(
                key,
                json.dumps(value, default=str) if isinstance(value, dict | list) else f"{value}",
            )
        Console().print(table)
    return 0


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="retroloop", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_params(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument(
            "--params",
            type=Path,
            default=Path("params.yaml"),
            help="params file (default params.yaml)",
        )
        return p

    p = with_params(sub.add_parser("stage", help="run one pipeline stage (what dvc.yaml calls)"))
    p.add_argument("name", choices=STAGES)
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a param (prefer dvc exp run -S)",
    )
    p.set_defaults(func=cmd_stage)

    p = with_params(
        sub.add_parser(
            "run", help="the whole pipeline as a Prefect flow (honours DVC's skip logic)"
        )
    )
    p.add_argument(
        "--force", action="store_true", help="rerun every stage even if DVC says it is up to date"
    )
    p.set_defaults(func=cmd_run)

    p = with_params(
        sub.add_parser("cycle", help="one continual-learning cycle on new domain data, now")
    )
    p.add_argument(
        "--domain-data",
        required=True,
        type=Path,
        help="JSONL/Parquet/text file of domain documents",
    )
    p.add_argument(
        "--format",
        default="text",
        choices=["text", "chat", "gsm8k"],
        help="format of --domain-data (gsm8k: question + worked answer as one document)",
    )
    p.set_defaults(func=cmd_cycle)

    p = with_params(
        sub.add_parser("schedule", help="serve the cycle flow on a cron schedule (Prefect)")
    )
    p.add_argument("--cron", required=True, help='cron expression, e.g. "0 3 * * *"')
    p.add_argument(
        "--watch-dir", default=None, help="folder of new domain files (default cycle.watch_dir)"
    )
    p.add_argument("--name", default="retroloop-cycle", help="deployment name")
    p.set_defaults(func=cmd_schedule)

    p = sub.add_parser("lineage", help="the provenance tree of one artifact")
    p.add_argument("artifact", type=Path)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_lineage)

    p = sub.add_parser("audit", help="every adapter with the teacher that produced it")
    p.add_argument("--root", type=Path, default=Path("data"))
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser("verify", help="re-hash artifacts and report mismatches")
    p.add_argument("artifact", nargs="?", type=Path)
    p.add_argument("--root", type=Path, default=Path("data"))
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser(
        "export", help="merge an adapter into its base: a self-contained model directory"
    )
    p.add_argument("adapter", type=Path, help="a PEFT adapter directory, e.g. data/opd/adapter")
    p.add_argument("--out", required=True, type=Path, help="directory to write (replaced)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("generate", help="generate from a model (+ adapter) at any recurrence")
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("--adapter", type=Path)
    p.add_argument("--recurrence", type=int, help="R for a looped model")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--raw", action="store_true", help="no chat template")
    p.add_argument("prompt")
    p.set_defaults(func=cmd_generate)

    p = with_params(sub.add_parser("bench", help="side-by-side benchmarks that print ratios"))
    p.add_argument("name", choices=["recurrence", "distill", "opd"])
    p.add_argument("--json", action="store_true")
    p.add_argument("--quick", action="store_true", help="small sizes (smoke run)")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return args.func(args)
    except RetroloopError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
