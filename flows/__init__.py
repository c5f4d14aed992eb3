"""Prefect flows: the pipeline, the continual-learning cycle and its schedule."""

import tasks  # noqa: F401  (sets analytics-off and the ephemeral start-up timeout first)
