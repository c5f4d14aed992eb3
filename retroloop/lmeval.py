"""`retroloop lm-eval …`: lm-eval's own command line, with the looped architecture registered.

`lm_eval --model hf --model_args pretrained=EXPORTED …` stops with "model type
`retroloop_recurrent` … not recognized": transformers learns the looped architecture only when
`retroloop` is imported (`retroloop/__init__.py` registers it with the Auto classes), and a
plain `lm_eval` process never imports it. This entry point imports it and hands every argument
to lm-eval's CLI unchanged, so the documented lm-eval commands work as they are written:

    retroloop lm-eval --model hf --model_args pretrained=out/merged,dtype=float32 \
        --tasks gsm8k --device cuda:0 --batch_size 8

Nothing is copied into the model directory and no `trust_remote_code` is needed: the
architecture's code is the installed retroloop, never code shipped inside a directory.
"""

from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    """Run lm-eval's CLI on `argv` (what follows `retroloop lm-eval`) and return its status."""
    from lm_eval.__main__ import cli_evaluate

    import retroloop  # noqa: F401  (registers RecurrentConfig / RecurrentForCausalLM)

    saved = sys.argv
    sys.argv = ["lm_eval", *argv]  # lm-eval's HarnessCLI reads sys.argv itself
    try:
        cli_evaluate()
    except SystemExit as done:  # argparse's --help / usage errors
        return done.code if isinstance(done.code, int) else (0 if done.code is None else 2)
    finally:
        sys.argv = saved
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
