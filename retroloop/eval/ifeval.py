"""IFEval grading with lm-eval's own instruction checkers (Zhou et al. 2023).

Strict: the checker on the response as is. Loose: lm-eval's upper bound, the checker on eight
variants (as is, without the first line, the last line or both, each with and without `*`).
Prompt-level accuracy: all of a prompt's instructions followed; instruction-level: per instruction.

Two checkers need NLTK data that cannot be downloaded here (`number_sentences` needs punkt,
`capital_word_frequency` needs punkt_tab). When the data is absent they are skipped and counted
(`skipped_instructions`), never run: lm-eval would raise a LookupError mid-evaluation.

Kwargs: lm-eval drops falsy kwargs (`if v`) before `build_description(**kwargs)`, and every
checker then fills a missing argument with `random.*` — a silently random grader. Here only
`None` is dropped (the hub copy of IFEval stores unused keys as nulls), a missing argument is a
`DataError`, and the global `random` state is pinned while a checker is built.

`synthetic_frame` builds the built-in `ifeval_synthetic` instruction set from these checkers.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
import random
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import polars as pl

from retroloop.datasets import CHAT_SCHEMA, chat_row, load_local
from retroloop.errors import DataError

log = logging.getLogger(__name__)

NLTK_DATA_INSTRUCTIONS = frozenset(
    {"length_constraints:number_sentences", "change_case:capital_word_frequency"}
)
# lm-eval's 25 registered checkers minus the two above: they run with no download at all.
OFFLINE_INSTRUCTIONS = frozenset(
    {
        "keywords:existence",
        "keywords:frequency",
        "keywords:forbidden_words",
        "keywords:letter_frequency",
        "language:response_language",
        "length_constraints:number_paragraphs",
        "length_constraints:number_words",
        "length_constraints:nth_paragraph_first_word",
        "detectable_content:number_placeholders",
        "detectable_content:postscript",
        "detectable_format:number_bullet_lists",
        "detectable_format:constrained_response",
        "detectable_format:number_highlighted_sections",
        "detectable_format:multiple_sections",
        "detectable_format:json_format",
        "detectable_format:title",
        "combination:two_responses",
        "combination:repeat_prompt",
        "startend:end_checker",
        "change_case:english_capital",
        "change_case:english_lowercase",
        "punctuation:no_comma",
        "startend:quotation",
    }
)
# What the synthetic instruction set draws from: repeat_prompt needs the prompt itself as a kwarg.
SYNTHETIC_INSTRUCTIONS = OFFLINE_INSTRUCTIONS - {"combination:repeat_prompt"}


# --------------------------------------------------------------------------- lm-eval access


@functools.cache
def registry() -> ModuleType:
    """`lm_eval.tasks.ifeval.instructions_registry`, imported quietly.

    Importing it calls `nltk.download("punkt_tab")` and prints to stdout; offline that is a
    failed network call and a misleading "Downloaded" line, so the download is a no-op here.
    """
    import langdetect
    import nltk

    real_download = nltk.download
    nltk.download = lambda *a, **k: False
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            from lm_eval.tasks.ifeval import instructions_registry
    finally:
        nltk.download = real_download
    langdetect.DetectorFactory.seed = 0  # langdetect samples; pin it so grades are reproducible
    return instructions_registry


def _util() -> ModuleType:
    """`lm_eval.tasks.ifeval.instructions_util` (word list, language codes, NLTK helpers)."""
    return registry().instructions.instructions_util


@functools.cache
def nltk_data_available(instruction_id: str) -> bool:
    """Whether an NLTK-data checker can run on this machine (probed once)."""
    instructions_util = _util()
    try:
        if instruction_id == "length_constraints:number_sentences":
            instructions_util.count_sentences("One sentence. Two sentences.")
        else:
            instructions_util.nltk.word_tokenize("Two WORDS")
    except Exception:  # LookupError without the data; pickle refusal on some nltk versions
        return False
    return True


def gradable(instruction_id: str) -> bool:
    if instruction_id in NLTK_DATA_INSTRUCTIONS:
        return nltk_data_available(instruction_id)
    return instruction_id in OFFLINE_INSTRUCTIONS


@contextlib.contextmanager
def _pinned_random() -> Iterator[None]:
    state = random.getstate()
    random.seed(0)
    try:
        yield
    finally:
        random.setstate(state)


def build_checker(instruction_id: str, kwargs: dict[str, Any]) -> Any:
    """The lm-eval checker for `instruction_id`, built with `kwargs` (None values dropped)."""
    cls = registry().INSTRUCTION_DICT.get(instruction_id)
    if cls is None:
        raise DataError(
            f"unknown IFEval instruction id {instruction_id!r}; see lm-eval's instructions_registry"
        )
    checker = cls(instruction_id)
    kwargs = {k: v for k, v in (kwargs or {}).items() if v is not None}
    with _pinned_random():
        missing = set(checker.get_instruction_args_keys() or []) - set(kwargs)
        if missing:
            raise DataError(
                f"IFEval instruction {instruction_id!r} lacks kwargs {sorted(missing)}; the checker "
                "would pick random values. Fix the record's kwargs"
            )
        checker.build_description(**kwargs)
    return checker


def describe(instruction_id: str, kwargs: dict[str, Any]) -> str:
    """The checker's own instruction text, `build_description(**kwargs)`."""
    cls = registry().INSTRUCTION_DICT[instruction_id]
    with _pinned_random():
        return cls(instruction_id).build_description(**kwargs)


def conflicts(a: str, b: str) -> bool:
    """lm-eval's INSTRUCTION_CONFLICTS, made symmetric (it is not, as shipped)."""
    table = registry().INSTRUCTION_CONFLICTS
    return a == b or b in table.get(a, ()) or a in table.get(b, ())


def sample_kwargs(instruction_id: str, rng: random.Random) -> dict[str, Any]:
    """Seeded kwargs for the synthetic set; ranges suit short (~100-token) responses."""
    instructions_util = _util()
    words = instructions_util.WORD_LIST
    relation = rng.choice(("less than", "at least"))
    match instruction_id:
        case "keywords:existence":
            return {"keywords": rng.sample(words, 2)}
        case "keywords:frequency":
            return {
                "keyword": rng.choice(words),
                "frequency": rng.randint(1, 3),
                "relation": relation,
            }
        case "keywords:forbidden_words":
            return {"forbidden_words": rng.sample(words, 2)}
        case "keywords:letter_frequency":
            letter = rng.choice("abcdefghijklmnopqrstuvwxyz")
            return {"letter": letter, "let_frequency": rng.randint(2, 10), "let_relation": relation}
        case "language:response_language":
            return {"language": rng.choice(sorted(instructions_util.LANGUAGE_CODES))}
        case "length_constraints:number_paragraphs":
            return {"num_paragraphs": rng.randint(2, 4)}
        case "length_constraints:number_words":
            return {"num_words": 10 * rng.randint(2, 10), "relation": relation}
        case "length_constraints:nth_paragraph_first_word":
            num = rng.randint(2, 4)
            return {
                "num_paragraphs": num,
                "nth_paragraph": rng.randint(1, num),
                "first_word": rng.choice(words),
            }
        case "detectable_content:number_placeholders":
            return {"num_placeholders": rng.randint(1, 4)}
        case "detectable_content:postscript":
            return {"postscript_marker": rng.choice(("P.S.", "P.P.S"))}
        case "detectable_format:number_bullet_lists":
            return {"num_bullets": rng.randint(2, 5)}
        case "detectable_format:number_highlighted_sections":
            return {"num_highlights": rng.randint(1, 3)}
        case "detectable_format:multiple_sections":
            return {
                "section_spliter": rng.choice(("Section", "SECTION")),
                "num_sections": rng.randint(2, 4),
            }
        case "startend:end_checker":
            return {
                "end_phrase": rng.choice(
                    ("Any other questions?", "Is there anything else I can help with?")
                )
            }
        case _:
            return {}  # checkers without arguments (title, json_format, no_comma, ...)


# --------------------------------------------------------------------------- grading


# --------------------------------------------------------------------------- built-in prompts


# Base tasks of the synthetic instruction set; the IFEval checker descriptions are appended.
_TASKS = (
    "Write a short note about {topic}.",
    "Explain {topic} to a new colleague.",
    "Describe {topic} in simple terms.",
    "Give practical advice about {topic}.",
    "Write a short story that involves {topic}.",
    "Write an email to a friend about {topic}.",
    "Summarize what a beginner should know about {topic}.",
    "Write a product description for a book on {topic}.",
)
_TOPICS = (
    "the water cycle", "learning a new language", "the history of bicycles", "time management",
    "composting at home", "the solar system", "public libraries", "baking bread", "volcanoes",
    "remote work", "honey bees", "the printing press", "saving money", "city parks",
    "the human heart", "chess openings", "recycling plastic", "a rainy day", "the moon landing",
    "healthy sleep", "train travel", "coral reefs", "writing a resume", "the internet",
    "mountain hiking", "board games", "electric cars", "a small bakery", "photosynthesis",
    "the Olympic games", "first aid", "jazz music", "a museum visit", "desert animals",
    "version control", "a job interview", "winter clothing", "the Roman empire",
    "growing tomatoes", "lighthouses",
)  # fmt: skip


def synthetic_frame(n: int, seed: int) -> pl.DataFrame:
    """Prompts = a base task + 1-2 IFEval instructions, gradable offline by lm-eval's checkers.

    Record i uses its own RNG seeded with (seed, i), so a larger `n` only appends records.
    Instructions come from `SYNTHETIC_INSTRUCTIONS` (no NLTK data, no prompt needed),
    pairs respect lm-eval's `INSTRUCTION_CONFLICTS`, and each description is the checker's
    own `build_description(**kwargs)` with the stored kwargs.
    """
    ids = sorted(SYNTHETIC_INSTRUCTIONS)
    rows = []
    for i in range(n):
        rng = random.Random(f"ifeval_synthetic:{seed}:{i}")
        task = rng.choice(_TASKS).format(topic=rng.choice(_TOPICS))
        chosen = [rng.choice(ids)]
        if rng.random() < 0.5:
            partners = [j for j in ids if not conflicts(chosen[0], j)]
            if partners:
                chosen.append(rng.choice(partners))
        kwargs = [sample_kwargs(iid, rng) for iid in chosen]
        descriptions = [describe(iid, kw) for iid, kw in zip(chosen, kwargs, strict=True)]
        rows.append(
            chat_row(
                f"ifeval_synthetic:{seed}:{i}",
                " ".join([task, *descriptions]),
                instruction_id_list=chosen,
                kwargs=kwargs,
            )
        )
    return pl.DataFrame(rows, schema=CHAT_SCHEMA)


def _loose_variants(response: str) -> list[str]:
    """lm-eval's `test_instruction_following_loose` variants, in its order."""
    lines = response.split("\n")
    first = "\n".join(lines[1:]).strip()
    last = "\n".join(lines[:-1]).strip()
    both = "\n".join(lines[1:-1]).strip()
    plain = [response, first, last, both]
    return [response, response.replace("*", ""), first, last, both] + [
        v.replace("*", "") for v in plain[1:]
    ]


def score_response(
    prompt: str,
    response: str,
    instruction_id_list: list[str],
    kwargs_list: list[dict[str, Any]] | str,
) -> dict[str, list]:
    """Grade one response. Returns `strict`, `loose` (one bool per graded instruction, in
    order), `graded` (their ids) and `skipped` (ids whose checker cannot run here)."""
    if isinstance(kwargs_list, str):
        kwargs_list = json.loads(kwargs_list)
    if len(kwargs_list) != len(instruction_id_list):
        raise DataError(
            f"IFEval record has {len(instruction_id_list)} instruction ids but {len(kwargs_list)} kwargs dicts"
        )
    variants = _loose_variants(response)
    out: dict[str, list] = {"strict": [], "loose": [], "graded": [], "skipped": []}
    for instruction_id, kwargs in zip(instruction_id_list, kwargs_list, strict=True):
        if not gradable(instruction_id):
            if instruction_id not in NLTK_DATA_INSTRUCTIONS:
                build_checker(instruction_id, kwargs)  # raises DataError for an unknown id
            out["skipped"].append(instruction_id)
            continue
        checker = build_checker(instruction_id, kwargs)
        out["strict"].append(bool(response.strip()) and bool(checker.check_following(response)))
        out["loose"].append(any(v.strip() and checker.check_following(v) for v in variants))
        out["graded"].append(instruction_id)
    return out


def aggregate(scores: list[dict[str, list]]) -> dict[str, float | int | None]:
    """Prompt- and instruction-level accuracy over graded instructions.

    A prompt counts at prompt level if at least one of its instructions was graded; its
    skipped instructions are left out (reported as `skipped_instructions`).
    """
    prompts = [s for s in scores if s["strict"]]
    strict = [b for s in prompts for b in s["strict"]]
    loose = [b for s in prompts for b in s["loose"]]

    def mean(xs: list[bool]) -> float | None:
        return sum(xs) / len(xs) if xs else None

    return {
        "prompt_strict": mean([all(s["strict"]) for s in prompts]),
        "prompt_loose": mean([all(s["loose"]) for s in prompts]),
        "inst_strict": mean(strict),
        "inst_loose": mean(loose),
        "prompts": len(prompts),
        "instructions": len(strict),
        "skipped_instructions": sum(len(s.get("skipped", [])) for s in scores),
    }


def load_ifeval(path: str | Path) -> pl.DataFrame:
    """IFEval's `input_data.jsonl` (key, prompt, instruction_id_list, kwargs) as a CHAT frame."""
    return load_local(path, "ifeval")
