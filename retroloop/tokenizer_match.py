"""Do a teacher and a student share one tokenizer? (DESIGN.md §5, §7)

Logit distillation compares the two models' distributions id by id, and on-policy distillation
has the teacher score the student's sampled token ids, so both need the same token → id map,
the same special-token ids (the sequences' bos / eos / padding) and the same chat template (a
template mismatch silently biases the teacher's log-probs). `tokenizer_differences` says what
differs, in words a user can act on; `check_same_tokenizer` turns that into one line.
"""

from __future__ import annotations

import hashlib

from transformers import PreTrainedTokenizerBase

from retroloop.errors import MismatchError

SPECIAL_TOKENS = ("bos", "eos", "pad", "unk")


def _ids_to_tokens(tokenizer: PreTrainedTokenizerBase) -> dict[int, str]:
    return {i: t for t, i in tokenizer.get_vocab().items()}


def _vocabulary(student: PreTrainedTokenizerBase, teacher: PreTrainedTokenizerBase) -> str | None:
    s, t = _ids_to_tokens(student), _ids_to_tokens(teacher)
    if s == t:
        return None
    first = min(i for i in s.keys() | t.keys() if s.get(i) != t.get(i))
    return (
        f"vocabulary ({len(s)} vs {len(t)} tokens; first differing id {first}: "
        f"{s.get(first, '<none>')!r} vs {t.get(first, '<none>')!r})"
    )


def _special_tokens(
    student: PreTrainedTokenizerBase, teacher: PreTrainedTokenizerBase
) -> str | None:
    differ = [
        f"{name} {getattr(student, f'{name}_token_id')} vs {getattr(teacher, f'{name}_token_id')}"
        for name in SPECIAL_TOKENS
        if getattr(student, f"{name}_token_id") != getattr(teacher, f"{name}_token_id")
    ]
    return f"special token ids ({', '.join(differ)})" if differ else None


def _chat_template(
    student: PreTrainedTokenizerBase, teacher: PreTrainedTokenizerBase
) -> str | None:
    s, t = student.chat_template or "", teacher.chat_template or ""
    if s == t:
        return None
    if not s or not t:
        return f"chat template ({'none' if not s else 'set'} vs {'none' if not t else 'set'})"
    at = next(
        (i for i, (a, b) in enumerate(zip(s, t, strict=False)) if a != b), min(len(s), len(t))
    )
    short = [hashlib.sha256(x.encode()).hexdigest()[:12] for x in (s, t)]
    return f"chat template (sha256 {short[0]} vs {short[1]}; first difference at character {at})"


def tokenizer_differences(
    student: PreTrainedTokenizerBase,
    teacher: PreTrainedTokenizerBase,
    *,
    logit_rows: tuple[int, int] | None = None,
) -> list[str]:
    """What differs between the student's and the teacher's tokenizer (student first in each
    pair), empty when they match. `logit_rows`: the two models' output-embedding rows, which
    must match too (a model may pad its vocabulary past the tokenizer's length)."""
    found = [
        d
        for d in (
            _vocabulary(student, teacher),
            _special_tokens(student, teacher),
            _chat_template(student, teacher),
        )
        if d
    ]
    if logit_rows is not None and logit_rows[0] != logit_rows[1]:
        found.append(f"logit width ({logit_rows[0]} vs {logit_rows[1]} output rows)")
    return found


def check_same_tokenizer(
    student: PreTrainedTokenizerBase,
    teacher: PreTrainedTokenizerBase,
    *,
    key: str = "prepare.teacher",
    student_name: str = "the source model",
    logit_rows: tuple[int, int] | None = None,
) -> None:
    """`MismatchError` (one line: `key`, every difference, what to do) unless `teacher` shares
    `student`'s tokenizer."""
    found = tokenizer_differences(student, teacher, logit_rows=logit_rows)
    if found:
        raise MismatchError(
            f"{key}: its tokenizer differs from {student_name}'s: {'; '.join(found)}; logit "
            "distillation needs one vocabulary, one set of special tokens and one chat template "
            "- pick a teacher of the same family (e.g. the instruct sibling or a larger size)"
        )
