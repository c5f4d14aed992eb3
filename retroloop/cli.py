"""The `retroloop` command. `retroloop --help` and `retroloop COMMAND --help` describe each.

Failures end in one line on stderr, `error: …`, and an exit code (`cli_parser.EXIT_CODES`, also printed by
`retroloop --help`): a mistake the user can fix (a `RetroloopError`, a file in the way, a full
disk, a bad argument) exits 2; Ctrl-C exits 130; anything unexpected exits 1 with its type and
message. `--debug` (or RETROLOOP_DEBUG=1) shows the full traceback of any of them.
The arguments and help are `retroloop.cli_parser`; what each subcommand does is in
`retroloop.commands`; this module runs the parsed command and handles its errors.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from pathlib import Path

from retroloop.cli_parser import build_parser
from retroloop.errors import RetroloopError, disk_full_reason


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


# --------------------------------------------------------------------------- errors


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [""])[0]


def _os_error_line(err: OSError) -> str:
    """One line for an OSError that escaped the library: the path and what to do."""
    path = Path(err.filename) if err.filename else None
    if isinstance(err, NotADirectoryError) and path is not None:
        blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), path)
        return f"{blocker}: is a file where a folder is needed; move or delete it, then rerun"
    if reason := disk_full_reason(err):
        return f"{path or 'writing'}: {reason}; free disk space (or raise `ulimit -f`), then rerun"
    if isinstance(err, PermissionError):
        return f"{path}: permission denied; check who owns it and its folder, then rerun"
    if isinstance(err, IsADirectoryError):
        return f"{path}: is a folder where a file is needed; give a file path"
    where = f"{path}: " if path else ""
    return f"{where}{err.strerror or _first_line(err)}; check the path, then rerun"


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["lm-eval"]:  # lm-eval parses its own arguments (retroloop.lmeval)
        from retroloop import lmeval

        return lmeval.main(argv[1:])
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get("RETROLOOP_DEBUG", "") not in ("", "0")
    _setup_logging(args.verbose)

    def fail(line: str, code: int) -> int:
        if debug:
            traceback.print_exc()
        print(f"error: {line}", file=sys.stderr)
        return code

    try:
        if args.command in ("run", "cycle", "schedule") and not debug:
            # Prefect prints a failed run's traceback before our one line; `flows` drops it from
            # the console when it starts Prefect (or now, if this process already has).
            os.environ["RETROLOOP_QUIET_PREFECT"] = "1"
            if "flows" in sys.modules:
                sys.modules["flows"].quiet_prefect_tracebacks()
        return args.func(args)
    except KeyboardInterrupt:
        return fail(
            "interrupted; the artifact being written was discarded (finished artifacts and "
            "resumable checkpoints stay); rerun to continue",
            130,
        )
    except RetroloopError as err:
        return fail(str(err), 2)
    except Exception as err:
        if isinstance(err, OSError):
            return fail(_os_error_line(err), 2)
        if reason := disk_full_reason(err):  # safetensors / torch wrap the OSError
            return fail(f"{reason} while writing; free disk space, then rerun", 2)
        return fail(
            f"{type(err).__name__}: {_first_line(err)} (unexpected; rerun with --debug for the "
            "traceback)",
            1,
        )


if __name__ == "__main__":
    sys.exit(main())
