"""Pipelines given as data to a running master: `dispatch_pipeline(pipeline_data)`.

`pipeline_data` is one pipeline in the shape of `pipelines.parse_pipeline_data` (its `name`,
its `jobs` as a table or a list, an optional `metadata` task), plus an optional `tasks` list
declaring user tasks, as in a pipelines file. It is validated by the same rules as the file:
every job's task must be built in, declared, or offered by a node the master knows. A
dispatched pipeline runs once, now; it has no schedule (schedules belong in the file that
`serve --pipelines` reads, where they survive restarts by design).

`pipeline_data_from_file` turns a pipelines file into such data, checked for everything but
task names (those the master checks, knowing its nodes): `master-node pipelines submit FILE`.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping
from typing import Any

from pipelines import PipelineConfig, PipelineConfigError, parse_pipeline_data, parse_pipelines
from pipelines.config import read_pipeline_toml

from master.pipelines_bridge.pipeline_file import BUILTIN_TASKS, TASKS_KEY, declared_tasks

__all__ = ["parse_dispatched", "pipeline_data_from_file", "node_task_names", "SOURCE"]

SOURCE = "dispatched pipeline"


def parse_dispatched(pipeline_data: Any, *, node_tasks: Collection[str] = ()) -> PipelineConfig:
    """The validated config of a dispatched pipeline; `PipelineConfigError` naming the pipeline,
    job and field at fault."""
    if not isinstance(pipeline_data, Mapping):
        raise PipelineConfigError(f"{SOURCE}: must be a table (dict) with a name and jobs, "
                                  f"got {type(pipeline_data).__name__}")
    data = dict(pipeline_data)
    declared = declared_tasks(data.pop(TASKS_KEY, []), SOURCE)
    config = parse_pipeline_data(data, known_tasks=BUILTIN_TASKS | declared | set(node_tasks),
                                 source=SOURCE)
    scheduled = ([f"pipelines.{config.name}.schedule"] if config.schedule else []) + [
        f"pipelines.{config.name}.jobs.{job.name}.schedule" for job in config.jobs
        if job.schedule]
    if scheduled:
        raise PipelineConfigError(
            f"{SOURCE}: {scheduled[0]}: a dispatched pipeline runs once, now; put scheduled "
            f"pipelines in the file of `master-node serve --pipelines FILE`",
            pipeline=config.name, job=None if config.schedule else config.jobs[0].name,
            field="schedule")
    return config


def pipeline_data_from_file(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Each pipeline of a pipelines file as `dispatch_pipeline` data, in file order."""
    source = os.fspath(path)
    document = read_pipeline_toml(source)
    declared = sorted(declared_tasks(document.get(TASKS_KEY, []), source))
    table = document.get("pipelines")
    if not table:
        raise PipelineConfigError(f"{source}: no [pipelines] table: define at least one "
                                  f"[pipelines.NAME.jobs.JOB]", field="pipelines")
    parse_pipelines(table, source=source)  # every mistake but a task name, named here
    out = []
    for name, definition in table.items():
        data: dict[str, Any] = {"name": name, **definition}
        if declared:
            data[TASKS_KEY] = declared
        out.append(data)
    return out


def node_task_names(nodes: Any) -> set[str]:
    """The task names the nodes of `get_node_info()` offer."""
    names: set[str] = set()
    for node in nodes or ():
        if isinstance(node, Mapping):
            names.update(t for t in node.get("tasks") or () if isinstance(t, str))
    return names
