"""Moved to `retroloop.cycle` (a cycle is not a DVC stage); this name stays for old imports."""

from retroloop.cycle import *  # noqa: F403
from retroloop.cycle import _sft  # noqa: F401  (tests/stage/test_non_finite.py)
