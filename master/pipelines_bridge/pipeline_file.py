"""The pipelines file `master-node serve --pipelines FILE` reads, validated before anything starts.

It is the TOML of `pipelines.config` (a `[pipelines.NAME]` table per pipeline) plus one optional
top-level list naming the user tasks the compute nodes provide:

```toml
tasks = ["fetch_rows", "summarise"]   # nodes started with --task mymodule:fetch_rows ...

[pipelines.report.jobs.fetch]
task = "fetch_rows"
```

A job may run a built-in task (`BUILTIN_TASKS`, which every CPython node offers) or a task the
file declares; anything else is an error naming the pipeline, the job and the field, so that a
typo stops `serve` at once instead of failing a run hours later. Declaring the names in the file
(rather than learning them from the nodes) keeps validation independent of which nodes happen
to be up when the master starts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines import PipelineConfig, PipelineConfigError, parse_pipelines
from pipelines.config import read_pipeline_toml

__all__ = ["BUILTIN_TASKS", "TASKS_KEY", "PipelineFile", "load_pipeline_file", "declared_tasks"]

BUILTIN_TASKS: frozenset[str] = frozenset({"noop", "echo", "sleep", "fail", "primes", "lambda"})
TASKS_KEY = "tasks"


@dataclass(frozen=True)
class PipelineFile:
    """A validated pipelines file: its pipelines and the user tasks it declares."""

    path: Path
    configs: tuple[PipelineConfig, ...]
    declared_tasks: frozenset[str]

    @property
    def known_tasks(self) -> frozenset[str]:
        """Every task name a job may run: the built-in ones and the declared ones."""
        return BUILTIN_TASKS | self.declared_tasks

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(config.name for config in self.configs)


def load_pipeline_file(path: str | os.PathLike[str]) -> PipelineFile:
    """Read and validate `path`; `PipelineConfigError` (naming pipeline, job, field) if wrong."""
    source = os.fspath(path)
    data = read_pipeline_toml(source)
    declared = declared_tasks(data.get(TASKS_KEY, []), source)
    if "pipelines" not in data:
        raise PipelineConfigError(f"{source}: no [pipelines] table: define at least one "
                                  f"[pipelines.NAME.jobs.JOB]", field="pipelines")
    configs = parse_pipelines(data["pipelines"], known_tasks=BUILTIN_TASKS | declared,
                              source=source)
    if not configs:
        raise PipelineConfigError(f"{source}: pipelines: the table is empty", field="pipelines")
    return PipelineFile(path=Path(source), configs=tuple(configs), declared_tasks=declared)


def declared_tasks(value: Any, source: str) -> frozenset[str]:
    """The user task names a `tasks` list declares; `PipelineConfigError` if it is not one."""
    if not isinstance(value, list):
        raise PipelineConfigError(f"{source}: {TASKS_KEY}: must be an array of task names, "
                                  f"got {type(value).__name__}", field=TASKS_KEY)
    for name in value:
        if not isinstance(name, str) or not name or "," in name or name != name.strip():
            raise PipelineConfigError(f"{source}: {TASKS_KEY}: {name!r} is not a task name",
                                      field=TASKS_KEY)
    return frozenset(value)
