"""The `retroloop` command's arguments and help: one `_<name>_command` per sub-command, in
the order `retroloop --help` lists them. `retroloop.cli` runs the parsed command and turns
failures into one line; what each command does is in `retroloop.commands`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import NoReturn

from retroloop import commands
from retroloop.config import STAGES

DESCRIPTION = """\
Retrofit depth recurrence into a pretrained LLM and teach it back cheaply.

retroloop rebuilds a pretrained decoder as prelude -> (adapter -> recurrent block) x R -> coda
from its own weights, then recovers what the conversion lost with LoRA logit distillation and
on-policy distillation. Each stage is a DVC stage (`dvc repro`) and a Prefect task (`retroloop
run`) that writes a versioned artifact with a manifest, so every adapter can be traced to the
teacher, data, params and code that produced it. params.yaml is the only tunable surface."""

EXIT_CODES = """\
exit codes:
  0    success
  1    `verify` or `audit` found a problem; or an unexpected error (one line with its type;
       rerun with --debug for the traceback)
  2    a mistake you can fix: a bad param, data file, model, adapter, path or argument, a file
       where a folder belongs, a full disk; one line `error: …` names it and what to do, and
       nothing half-written is left behind
  130  interrupted (Ctrl-C): the artifact being written is discarded; finished artifacts and
       resumable checkpoints stay"""

EPILOG = f"""\
examples:
  cp profiles/tiny.yaml params.yaml && dvc repro   # whole pipeline, tiny model, minutes on CPU
  dvc exp run -S distill.steps=80                  # an override that dvc.lock records
  retroloop run                                    # the same pipeline as a Prefect flow
  retroloop stage distill --set distill.lr=5e-4    # one stage by hand (DVC does not see --set)
  retroloop cycle --domain-data notes.jsonl        # one continual-learning cycle now
  retroloop audit                                  # which teacher produced which adapter
  retroloop generate --model data/convert/model --adapter data/opd/adapter \\
      --recurrence 4 "Explain list comprehensions."

{EXIT_CODES}

environment:
  RETROLOOP_DEBUG=1   same as --debug (full tracebacks)"""

SET_HELP = (
    "override one param for this command only, as a dotted key (repeatable), e.g. "
    "--set distill.lora.r=8; VALUE is YAML (8, 5e-4, true, [1, 2], null)"
)


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line and exit 2, like every other user error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {self.prog}: {message}; see `{self.prog} --help`\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1 (R=1 runs the block once)")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The `retroloop` parser: global flags, then one sub-command per `_<name>_command`, in
    the order `retroloop --help` lists them."""
    parser = _Parser(
        prog="retroloop",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug-level logs on stderr")
    parser.add_argument(
        "--debug",
        action="store_true",
        help="show the full traceback of any failure (also: RETROLOOP_DEBUG=1)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (
        _stage_command,
        _run_command,
        _cycle_command,
        _schedule_command,
        _lineage_command,
        _audit_command,
        _verify_command,
        _export_command,
        _lm_eval_command,
        _generate_command,
        _bench_command,
    ):
        add(sub)
    return parser


def _command(
    sub, name: str, summary: str, description: str, examples: str
) -> argparse.ArgumentParser:
    """One sub-command with its summary, description, examples and the exit codes."""
    return sub.add_parser(
        name,
        help=summary,
        description=f"{summary[0].upper()}{summary[1:]}.\n\n{description}",
        epilog=f"examples:\n{examples}\n\n{EXIT_CODES}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def _with_params(p: argparse.ArgumentParser, set_help: str = SET_HELP) -> None:
    """--params FILE and repeatable --set KEY=VALUE."""
    p.add_argument(
        "--params",
        type=Path,
        default=Path("params.yaml"),
        metavar="FILE",
        help="params file, validated before anything runs (default: params.yaml)",
    )
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=set_help)


def _stage_command(sub) -> None:
    p = _command(
        sub,
        "stage",
        "run one pipeline stage (what dvc.yaml calls)",
        "Reads its inputs under data/, writes data/<stage>/ atomically with a manifest, and\n"
        "prints the manifest's hash and metrics as JSON. `dvc repro` calls this for you and\n"
        "records the params in dvc.lock; a hand-run --set is used and recorded in the\n"
        "artifact's manifest, but DVC does not see it (dvc status then calls the stage\n"
        "changed). For overrides DVC records, use `dvc exp run -S KEY=VALUE`.",
        "  retroloop stage prepare\n  retroloop stage distill --set distill.steps=4",
    )
    p.add_argument("name", choices=STAGES, metavar="NAME", help=f"one of: {', '.join(STAGES)}")
    _with_params(p, SET_HELP + "; DVC does not see it")
    p.set_defaults(func=commands.cmd_stage)


def _run_command(sub) -> None:
    p = _command(
        sub,
        "run",
        "run the whole pipeline as a Prefect flow",
        "One task run per stage in dvc.yaml's order. Stages `dvc status` calls current are\n"
        "skipped and what runs is committed to dvc.lock, so `dvc repro` and the flow agree.\n"
        "With --set (or --params other than params.yaml) DVC is bypassed: every stage runs\n"
        "with the merged params and dvc.lock is not updated. Set PREFECT_API_URL to watch\n"
        "it in a Prefect server's UI; without it a temporary local API is used.",
        "  retroloop run\n  retroloop run --force\n"
        "  retroloop run --set distill.steps=4   # every stage reruns; dvc.lock untouched",
    )
    _with_params(
        p,
        SET_HELP + "; bypasses DVC: every stage reruns and dvc.lock is not updated "
        "(to record overrides in dvc.lock use `dvc exp run -S KEY=VALUE`)",
    )
    p.add_argument(
        "--force", action="store_true", help="rerun every stage even if DVC says it is up to date"
    )
    p.set_defaults(func=commands.cmd_run)


def _cycle_command(sub) -> None:
    p = _command(
        sub,
        "cycle",
        "run one continual-learning cycle on new domain data, now",
        "Mid-trains the current model's LoRA on the domain file, measures forgetting, recovers\n"
        "it with on-policy distillation from the previous model, and registers the cycle under\n"
        "cycle.registry (a Prefect flow). Needs the pipeline's outputs (`dvc repro` first).\n"
        "The domain file is checked before the flow starts.",
        "  retroloop cycle --domain-data notes.jsonl\n"
        "  retroloop cycle --domain-data train.jsonl --format gsm8k --set cycle.midtrain_steps=40",
    )
    p.add_argument(
        "--domain-data",
        required=True,
        type=Path,
        metavar="FILE",
        help="domain documents: .jsonl/.json/.parquet in --format, or .txt/.md "
        "(documents separated by blank lines)",
    )
    p.add_argument(
        "--format",
        default="text",
        choices=["text", "chat", "gsm8k"],
        help="format of --domain-data: text ('text' field), chat ('prompt'/'response' or "
        "'messages'), gsm8k ('question' + worked 'answer' as one document); default text",
    )
    _with_params(p)
    p.set_defaults(func=commands.cmd_cycle)


def _schedule_command(sub) -> None:
    p = _command(
        sub,
        "schedule",
        "serve the cycle flow on a cron schedule (Prefect)",
        "Serves a Prefect deployment that, at every tick, runs one cycle per new file in the\n"
        "watched folder (oldest first, each file once). Runs until stopped. With --set the\n"
        "merged params are fixed for the life of the process.\n\n"
        "With --remote, registers the same schedule on the Prefect server (PREFECT_API_URL)\n"
        "for the workers of --pool that share no disk with you, and returns: each run clones\n"
        "HEAD from origin (it must be pushed), pulls its inputs from the worker's DVC remote\n"
        "and pushes each registered cycle (DVC objects, then its .dvc file on the git branch\n"
        "retroloop-cycles). --watch-dir is then a folder on the worker's machine.",
        '  retroloop schedule --cron "0 3 * * *"\n'
        '  retroloop schedule --cron "*/30 * * * *" --watch-dir inbox/\n'
        '  retroloop schedule --remote --cron "0 3 * * *" --watch-dir /srv/inbox --pool gpu',
    )
    p.add_argument("--cron", required=True, help='cron expression, e.g. "0 3 * * *" (03:00 daily)')
    p.add_argument(
        "--watch-dir",
        default=None,
        metavar="DIR",
        help="folder of new domain files (default: cycle.watch_dir)",
    )
    p.add_argument(
        "--name",
        default=None,
        help="deployment name (default: retroloop-cycle; with --remote retroloop-cycle-remote)",
    )
    p.add_argument(
        "--remote",
        action="store_true",
        help="register it for workers that share no disk (git clone of HEAD + push) and return",
    )
    p.add_argument(
        "--pool", default="gpu", help="with --remote: the work pool its workers poll (default: gpu)"
    )
    _with_params(p)
    p.set_defaults(func=commands.cmd_schedule)


def _lineage_command(sub) -> None:
    p = _command(
        sub,
        "lineage",
        "show the provenance tree of one artifact",
        "Walks the manifests back from ARTIFACT to the base model, teacher cache and datasets,\n"
        "with each input's role and content hash.",
        "  retroloop lineage data/opd/adapter\n  retroloop lineage data/distill --json",
    )
    p.add_argument(
        "artifact", type=Path, metavar="ARTIFACT", help="an artifact path, e.g. data/opd/adapter"
    )
    p.add_argument("--json", action="store_true", help="print the tree as JSON on stdout")
    p.set_defaults(func=commands.cmd_lineage)


def _audit_command(sub) -> None:
    p = _command(
        sub,
        "audit",
        "list every adapter with the teacher that produced it",
        "One row per adapter under --root (pipeline stages and registered cycles): its status\n"
        "(OK or BAD with the reason), the teacher model and hashes. Exits 1 if any is BAD.",
        "  retroloop audit\n  retroloop audit --json | jq '.[].teacher.path'",
    )
    p.add_argument(
        "--root",
        type=Path,
        default=Path("data"),
        metavar="DIR",
        help="folder searched for artifacts (default: data)",
    )
    p.add_argument("--json", action="store_true", help="print the rows as JSON on stdout")
    p.set_defaults(func=commands.cmd_audit)


def _verify_command(sub) -> None:
    p = _command(
        sub,
        "verify",
        "re-hash artifacts and report mismatches",
        "Re-hashes every file of each artifact against its manifest and each recorded input\n"
        "against its upstream artifact. Prints OK or BAD per artifact; exits 1 if any is BAD.",
        "  retroloop verify\n  retroloop verify data/opd",
    )
    p.add_argument(
        "artifact",
        nargs="?",
        type=Path,
        metavar="ARTIFACT",
        help="one artifact to check (default: every artifact under --root)",
    )
    p.add_argument(
        "--root",
        type=Path,
        default=Path("data"),
        metavar="DIR",
        help="folder searched for artifacts (default: data)",
    )
    p.set_defaults(func=commands.cmd_verify)


def _export_command(sub) -> None:
    p = _command(
        sub,
        "export",
        "merge an adapter into its base model: a self-contained model directory",
        "Writes a transformers save_pretrained directory (+ manifest naming the adapter) that\n"
        "loads without retroloop's data/ folder.",
        "  retroloop export data/opd/adapter --out merged/",
    )
    p.add_argument(
        "adapter",
        type=Path,
        metavar="ADAPTER",
        help="a PEFT adapter directory, e.g. data/opd/adapter",
    )
    p.add_argument(
        "--out", required=True, type=Path, metavar="DIR", help="directory to write (replaced)"
    )
    p.set_defaults(func=commands.cmd_export)


def _lm_eval_command(sub) -> None:
    p = _command(
        sub,
        "lm-eval",
        "lm-eval's own command line, with the looped architecture registered",
        "Everything after `lm-eval` goes to lm-eval's CLI unchanged (`lm_eval --help` lists it).\n"
        "A plain `lm_eval --model hf` cannot load an exported looped model: transformers learns\n"
        "model_type retroloop_recurrent only when retroloop is imported. No trust_remote_code.",
        "  retroloop export data/opd/adapter --out merged/\n"
        "  retroloop lm-eval --model hf --model_args pretrained=merged/ --tasks gsm8k \\\n"
        "      --device cuda:0 --batch_size 8",
    )
    # retroloop.cli hands `lm-eval …` to retroloop.lmeval before parsing (argparse would take
    # lm-eval's own --options for ours); this entry is for `retroloop --help`.
    p.add_argument("lm_eval_args", nargs=argparse.REMAINDER, metavar="ARGS")


def _generate_command(sub) -> None:
    p = _command(
        sub,
        "generate",
        "generate text from a model (+ adapter) at any recurrence",
        "Streams the reply to stdout as it is produced and prints tokens/s to stderr. The\n"
        "prompt is wrapped in the model's chat template unless --raw. No code from the model\n"
        "or adapter directory is ever run (trust_remote_code=False).",
        '  retroloop generate --model data/convert/model --recurrence 4 "What is a closure?"\n'
        "  retroloop generate --model data/convert/model --adapter data/opd/adapter \\\n"
        '      --max-new-tokens 128 "Explain list comprehensions."',
    )
    p.add_argument(
        "--model",
        required=True,
        type=Path,
        metavar="DIR",
        help="a save_pretrained model directory, e.g. data/convert/model or data/prepare/model",
    )
    p.add_argument(
        "--adapter",
        type=Path,
        metavar="DIR",
        help="a PEFT adapter directory on that model, e.g. data/opd/adapter",
    )
    p.add_argument(
        "--recurrence",
        type=_positive_int,
        metavar="R",
        help="iterations of the recurrent block (>= 1; looped models only; default: the R "
        "stored in the model's config)",
    )
    p.add_argument(
        "--max-new-tokens",
        type=_positive_int,
        default=64,
        metavar="N",
        help="tokens to generate (default 64)",
    )
    p.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        metavar="T",
        help="sampling temperature; 0 = greedy (default 0)",
    )
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--raw", action="store_true", help="send PROMPT as is, without chat template")
    p.add_argument("prompt", metavar="PROMPT", help="the user message")
    p.set_defaults(func=commands.cmd_generate)


def _bench_command(sub) -> None:
    p = _command(
        sub,
        "bench",
        "run a side-by-side benchmark that prints ratios",
        "recurrence: forward tokens/s of the looped model at R = 1..8 against its source;\n"
        "distill: the teacher cache and LoRA distillation step against the uncached way;\n"
        "opd: on-policy distillation's rollout speed, step anatomy and sample efficiency\n"
        "against the reference recipe; peer: retroloop's distill and OPD against TRL's GKDTrainer\n"
        "(needs pip install 'retroloop[peer]'). Candidates are timed in interleaved rounds of one run,\n"
        "so the ratios are comparable; absolute numbers depend on the machine.",
        "  retroloop bench recurrence --quick\n  retroloop bench distill --json",
    )
    p.add_argument(
        "name",
        choices=["recurrence", "distill", "opd", "peer"],
        metavar="NAME",
        help="one of: recurrence, distill, opd, peer",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    p.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    _with_params(p)
    p.set_defaults(func=commands.cmd_bench)
