"""One module per DVC stage, each exposing `run(cfg, *, inputs=None, out_dir=...) -> Manifest`.

The Prefect tasks in `tasks/`, the `retroloop stage NAME` command that `dvc.yaml` calls,
and the tests all call these functions; nothing else implements a stage.
"""
