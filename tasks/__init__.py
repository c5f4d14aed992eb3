"""Thin Prefect tasks: one per stage, each calling `retroloop.stages.<name>.run`."""

import os

# Analytics off and a start-up timeout that survives a first start of the temporary
# local API (its first migration can take longer than Prefect's default 20 s).
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
# The library's log lines (logger "retroloop") go to the run's logs in the UI. Prefect reads
# this when it sets up logging, so it works where flows/ is imported before Prefect (the CLI);
# a worker's flow process gets it from prefect.yaml, and the cycle flow adds the handler itself.
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "retroloop")
