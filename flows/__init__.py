"""Prefect flows: the pipeline, the continual-learning cycle and its schedule."""

import logging
import os

import tasks  # noqa: F401  (sets analytics-off and the ephemeral start-up timeout first)


class _NoTraceback(logging.Filter):
    """Keep a record's message, drop its traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.exc_info, record.exc_text = None, None
        return True


def quiet_prefect_tracebacks() -> None:
    """A failed flow or task run makes Prefect log the exception with its traceback on the
    console; the `retroloop` CLI ends in one `error:` line instead (`--debug` shows all). Every
    handler but Prefect's API ones (the console: Prefect's, or the CLI's rich handler) keeps
    each message and drops the traceback. Prefect's API handler
    formats a record before the record reaches the console, so the run's logs in the UI keep
    the full traceback. The CLI asks for this (RETROLOOP_QUIET_PREFECT=1); a worker does not."""
    import prefect.main  # noqa: F401  (sets up Prefect's logging first, once per process)
    from prefect.logging.handlers import APILogHandler, WorkerAPILogHandler

    loggers = [logging.getLogger()] + [
        logger
        for name, logger in logging.Logger.manager.loggerDict.items()
        if isinstance(logger, logging.Logger) and name.startswith(("prefect", "uvicorn", "fastapi"))
    ]
    for logger in loggers:
        for handler in logger.handlers:
            if not isinstance(handler, APILogHandler | WorkerAPILogHandler) and not any(
                isinstance(f, _NoTraceback) for f in handler.filters
            ):
                handler.addFilter(_NoTraceback())


if os.environ.get("RETROLOOP_QUIET_PREFECT") == "1":
    quiet_prefect_tracebacks()
