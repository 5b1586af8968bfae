"""Pipeline definitions: frozen configs, read from TOML and validated on load.

```toml
[pipelines.etl]
schedule = "5m"            # optional: run the whole pipeline at this interval
metadata = "load_meta"     # optional: a task whose output every job receives as `metadata`

[pipelines.etl.jobs.extract]
task = "echo"              # the fabric task the job runs (default: the job's own name)
args = [1]                 # optional, JSON values
kwargs = {}                # optional, JSON values
priority = 5               # optional, 1-10, 10 most urgent
retries = 2                # optional: attempts after the first one fails
timeout = "30s"            # optional: time string or seconds, per attempt (default 1h)
depends_on = []            # optional: jobs of this pipeline that must complete first
schedule = "10m"           # optional: also re-run this job alone at this interval
```

Only the `pipelines` table is read; other top-level tables belong to other parts of the fabric.
Every error names the file, pipeline, job and field, e.g.
``etl.toml: pipelines.etl.jobs.load.depends_on: unknown job 'extrac'``.

A pipeline given as data (`parse_pipeline_data`) is the same table with its `name` inside, and
its jobs either as that table or as a list of job tables that carry their own `name`:

    {"name": "etl", "jobs": [{"name": "extract", "task": "echo", "args": [1]},
                             {"name": "load", "depends_on": ["extract"]}]}

It is validated by the same rules, so the same mistakes give the same errors.
"""

from __future__ import annotations

import math
import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from core.errors import ConfigError
from core.protocol import DEFAULT_PRIORITY, MAX_PRIORITY, MIN_PRIORITY
from core.topics import validate_id

from pipelines.errors import PipelineConfigError, ScheduleError
from pipelines.timestrings import parse_time_string

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

__all__ = [
    "JobConfig",
    "PipelineConfig",
    "load_pipelines",
    "parse_pipelines",
    "parse_pipeline_data",
    "read_pipeline_toml",
    "DEFAULT_TIMEOUT",
    "DEFAULT_RETRIES",
    "INPUTS_KWARG",
    "METADATA_KWARG",
]

DEFAULT_TIMEOUT = 3600.0
DEFAULT_RETRIES = 0
INPUTS_KWARG = "inputs"
METADATA_KWARG = "metadata"

_PIPELINE_KEYS = ("schedule", "metadata", "jobs")
_JOB_KEYS = ("task", "args", "kwargs", "priority", "retries", "timeout", "depends_on", "schedule")


@dataclass(frozen=True)
class JobConfig:
    """One job of a pipeline: the fabric task it runs and how."""

    name: str
    task: str
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    priority: int = DEFAULT_PRIORITY
    retries: int = DEFAULT_RETRIES
    timeout: float = DEFAULT_TIMEOUT
    depends_on: tuple[str, ...] = ()
    schedule: str | None = None

    @property
    def interval(self) -> int | None:
        """Seconds between runs of this job alone, or None when it has no schedule."""
        return None if self.schedule is None else parse_time_string(self.schedule)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable copy, as stored with the job's versions."""
        return {"name": self.name, "task": self.task, "args": list(self.args),
                "kwargs": dict(self.kwargs), "priority": self.priority,
                "retries": self.retries, "timeout": self.timeout,
                "depends_on": list(self.depends_on), "schedule": self.schedule}


@dataclass(frozen=True)
class PipelineConfig:
    """Named jobs with dependencies, an optional schedule and an optional metadata task."""

    name: str
    jobs: tuple[JobConfig, ...]
    schedule: str | None = None
    metadata: str | None = None

    def __post_init__(self) -> None:
        """Refuse a graph the executor could never finish, however the config was built."""
        if not self.jobs:
            raise PipelineConfigError(f"pipelines.{self.name}.jobs: a pipeline needs a job",
                                      pipeline=self.name, field="jobs")
        problem = _graph_problem(self.jobs)
        if problem is not None:
            job, message = problem
            raise PipelineConfigError(f"pipelines.{self.name}.jobs.{job}.depends_on: {message}",
                                      pipeline=self.name, job=job, field="depends_on")

    @property
    def interval(self) -> int | None:
        """Seconds between runs of the whole pipeline, or None when it has no schedule."""
        return None if self.schedule is None else parse_time_string(self.schedule)

    @property
    def job_names(self) -> tuple[str, ...]:
        return tuple(job.name for job in self.jobs)

    def job(self, name: str) -> JobConfig:
        """The job called `name`; `KeyError` if there is none."""
        for job in self.jobs:
            if job.name == name:
                return job
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable copy, as stored with the pipeline's versions."""
        return {"name": self.name, "schedule": self.schedule, "metadata": self.metadata,
                "jobs": [job.to_dict() for job in self.jobs]}


def load_pipelines(
    path: str | os.PathLike[str], *, known_tasks: Collection[str] | None = None
) -> list[PipelineConfig]:
    """The pipelines of a TOML file, validated; `PipelineConfigError` names what is wrong.

    With `known_tasks`, every job's task (and metadata task) must be one of them.
    """
    source = os.fspath(path)
    data = read_pipeline_toml(source)
    if "pipelines" not in data:
        raise PipelineConfigError(f"{source}: no [pipelines] table", field="pipelines")
    return parse_pipelines(data["pipelines"], known_tasks=known_tasks, source=source)


def read_pipeline_toml(source: str) -> dict[str, Any]:
    """The TOML document at `source`; `PipelineConfigError` if it cannot be read or parsed."""
    try:
        with open(source, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise PipelineConfigError(f"{source}: cannot read pipeline file: {e}") from e
    except tomllib.TOMLDecodeError as e:
        raise PipelineConfigError(f"{source}: not valid TOML: {e}") from e


def parse_pipelines(
    pipelines: Mapping[str, Any],
    *,
    known_tasks: Collection[str] | None = None,
    source: str = "<pipelines>",
) -> list[PipelineConfig]:
    """Validated configs from the contents of a `[pipelines]` table (name -> definition)."""
    if not isinstance(pipelines, Mapping):
        raise PipelineConfigError(f"{source}: pipelines: must be a table of pipelines, got "
                                  f"{_kind(pipelines)}", field="pipelines")
    return [_Parser(source, name, known_tasks).pipeline(definition)
            for name, definition in pipelines.items()]


def parse_pipeline_data(
    data: Mapping[str, Any] | PipelineConfig,
    *,
    name: str | None = None,
    known_tasks: Collection[str] | None = None,
    source: str = "<pipeline data>",
) -> PipelineConfig:
    """A validated config from one pipeline given as data (see the module docstring).

    `name` names the pipeline when the data does not (a data `name` must then agree). A
    `PipelineConfig` is taken as it is, checked only against `known_tasks`.
    """
    if isinstance(data, PipelineConfig):
        data = data.to_dict()
    if not isinstance(data, Mapping):
        raise PipelineConfigError(f"{source}: a pipeline must be a table (dict), got "
                                  f"{_kind(data)}")
    table = dict(data)
    given = table.pop("name", None)
    if given is not None and name is not None and given != name:
        raise PipelineConfigError(f"{source}: pipelines.{name}.name: says {given!r}",
                                  pipeline=name, field="name")
    chosen = given if given is not None else name
    if not isinstance(chosen, str):
        raise PipelineConfigError(f"{source}: a pipeline needs a name (the key 'name'), got "
                                  f"{chosen!r}", field="name")
    parser = _Parser(source, chosen, known_tasks)
    jobs = table.get("jobs")
    if isinstance(jobs, (list, tuple)):
        table["jobs"] = parser.job_list(jobs)
    return parser.pipeline(table)


class _Parser:
    """Validates one pipeline, so that every error can say where it is."""

    def __init__(self, source: str, pipeline: str, known_tasks: Collection[str] | None) -> None:
        self.source = source
        self.name = pipeline
        self.known_tasks = known_tasks

    def error(self, message: str, *, job: str | None = None,
              field: str | None = None) -> PipelineConfigError:
        where = f"pipelines.{self.name}"
        if job is not None:
            where += f".jobs.{job}"
        if field is not None:
            where += f".{field}"
        return PipelineConfigError(f"{self.source}: {where}: {message}",
                                   pipeline=self.name, job=job, field=field)

    def pipeline(self, definition: Any) -> PipelineConfig:
        self.check_name(self.name, None)
        table = self.table(definition, job=None, field=None)
        self.check_keys(table, _PIPELINE_KEYS, job=None)
        schedule = self.schedule(table.get("schedule"), job=None)
        metadata = table.get("metadata")
        if metadata is not None:
            self.task_name(metadata, job=None, field="metadata")
        jobs_table = table.get("jobs")
        if jobs_table is None:
            raise self.error("has no jobs: add a [pipelines.NAME.jobs.JOB] table", field="jobs")
        jobs_table = self.table(jobs_table, job=None, field="jobs")
        if not jobs_table:
            raise self.error("has no jobs: add a [pipelines.NAME.jobs.JOB] table", field="jobs")
        jobs = tuple(self.job(name, spec, has_metadata=metadata is not None)
                     for name, spec in jobs_table.items())
        self.check_dependencies(jobs)
        return PipelineConfig(name=self.name, jobs=jobs, schedule=schedule, metadata=metadata)

    def job(self, name: str, spec: Any, *, has_metadata: bool) -> JobConfig:
        self.check_name(name, name)
        table = self.table(spec, job=name, field=None)
        self.check_keys(table, _JOB_KEYS, job=name)
        task = self.task_name(table.get("task", name), job=name, field="task")
        args = table.get("args", [])
        if not isinstance(args, list):
            raise self.error(f"must be an array, got {_kind(args)}", job=name, field="args")
        self.check_json(args, job=name, field="args")
        kwargs = table.get("kwargs", {})
        if not isinstance(kwargs, Mapping):
            raise self.error(f"must be a table, got {_kind(kwargs)}", job=name, field="kwargs")
        self.check_json(kwargs, job=name, field="kwargs")
        depends_on = table.get("depends_on", [])
        if not isinstance(depends_on, list) or not all(isinstance(d, str) for d in depends_on):
            raise self.error(f"must be an array of job names, got {depends_on!r}", job=name,
                             field="depends_on")
        if len(set(depends_on)) != len(depends_on):
            raise self.error(f"lists a job twice: {depends_on!r}", job=name, field="depends_on")
        reserved = []
        if depends_on:
            reserved.append(INPUTS_KWARG)
        if has_metadata:
            reserved.append(METADATA_KWARG)
        for key in reserved:
            if key in kwargs:
                raise self.error(f"key {key!r} is reserved: the pipeline passes it to the task",
                                 job=name, field="kwargs")
        return JobConfig(
            name=name,
            task=task,
            args=tuple(args),
            kwargs=MappingProxyType(dict(kwargs)),
            priority=self.integer(table, "priority", DEFAULT_PRIORITY, MIN_PRIORITY,
                                  MAX_PRIORITY, job=name),
            retries=self.integer(table, "retries", DEFAULT_RETRIES, 0, None, job=name),
            timeout=self.timeout(table.get("timeout", DEFAULT_TIMEOUT), job=name),
            depends_on=tuple(depends_on),
            schedule=self.schedule(table.get("schedule"), job=name),
        )

    def job_list(self, jobs: list[Any] | tuple[Any, ...]) -> dict[str, Any]:
        """Jobs given as a list of tables with a `name` each, as the table of jobs by name."""
        table: dict[str, Any] = {}
        for index, spec in enumerate(jobs):
            if not isinstance(spec, Mapping):
                raise self.error(f"item {index} must be a table, got {_kind(spec)}",
                                 field="jobs")
            rest = dict(spec)
            job = rest.pop("name", None)
            if not isinstance(job, str):
                raise self.error(f"item {index} needs a name (the key 'name'), got {job!r}",
                                 field="jobs")
            if job in table:
                raise self.error(f"two jobs are called {job!r}", job=job)
            table[job] = rest
        return table

    def check_name(self, name: str, job: str | None) -> None:
        try:
            validate_id(name, what="job name" if job is not None else "pipeline name")
        except ConfigError as e:
            raise self.error(str(e), job=job) from e

    def table(self, value: Any, *, job: str | None, field: str | None) -> Mapping[str, Any]:
        if not isinstance(value, Mapping):
            raise self.error(f"must be a table, got {_kind(value)}", job=job, field=field)
        return value

    def check_keys(self, table: Mapping[str, Any], allowed: tuple[str, ...], *,
                   job: str | None) -> None:
        for key in table:
            if key not in allowed:
                raise self.error(f"unknown key (allowed: {', '.join(allowed)})", job=job,
                                 field=key)

    def task_name(self, value: Any, *, job: str | None, field: str) -> str:
        if not isinstance(value, str) or not value:
            raise self.error(f"must be a task name, got {value!r}", job=job, field=field)
        if self.known_tasks is not None and value not in self.known_tasks:
            known = ", ".join(sorted(self.known_tasks)) or "none"
            raise self.error(f"unknown task {value!r} (known tasks: {known})", job=job,
                             field=field)
        return value

    def schedule(self, value: Any, *, job: str | None) -> str | None:
        if value is None:
            return None
        try:
            parse_time_string(value)
        except ScheduleError as e:
            raise self.error(str(e), job=job, field="schedule") from e
        return value

    def timeout(self, value: Any, *, job: str) -> float:
        if isinstance(value, str):
            try:
                return float(parse_time_string(value))
            except ScheduleError as e:
                raise self.error(str(e), job=job, field="timeout") from e
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value) or value <= 0:
            raise self.error(f"must be a time string like '30s' or a positive number of "
                             f"seconds, got {value!r}", job=job, field="timeout")
        return float(value)

    def integer(self, table: Mapping[str, Any], key: str, default: int, low: int,
                high: int | None, *, job: str) -> int:
        value = table.get(key, default)
        in_range = isinstance(value, int) and not isinstance(value, bool) and value >= low \
            and (high is None or value <= high)
        if not in_range:
            bounds = f"{low}-{high}" if high is not None else f">= {low}"
            raise self.error(f"must be an integer {bounds}, got {value!r}", job=job, field=key)
        return value

    def check_json(self, value: Any, *, job: str, field: str) -> None:
        if isinstance(value, (str, int, float, bool)):
            return
        if isinstance(value, list):
            for item in value:
                self.check_json(item, job=job, field=field)
            return
        if isinstance(value, Mapping) and all(isinstance(key, str) for key in value):
            for item in value.values():
                self.check_json(item, job=job, field=field)
            return
        raise self.error(f"{value!r} cannot be sent to a task ({_kind(value)}); use strings, "
                         f"numbers, booleans, arrays and tables", job=job, field=field)

    def check_dependencies(self, jobs: tuple[JobConfig, ...]) -> None:
        problem = _graph_problem(jobs)
        if problem is not None:
            job, message = problem
            raise self.error(message, job=job, field="depends_on")


def _graph_problem(jobs: tuple[JobConfig, ...]) -> tuple[str, str] | None:
    """(job, what is wrong) for the first unknown dependency or cycle, or None."""
    names = [job.name for job in jobs]
    for job in jobs:
        if names.count(job.name) > 1:
            return job.name, f"two jobs are called {job.name!r}"
        for dependency in job.depends_on:
            if dependency not in names:
                return job.name, (f"unknown job {dependency!r} (jobs: "
                                  f"{', '.join(sorted(names))})")
    cycle = _find_cycle({job.name: job.depends_on for job in jobs})
    if cycle:
        return cycle[0], f"dependency cycle: {' -> '.join(cycle)}"
    return None


def _find_cycle(graph: Mapping[str, tuple[str, ...]]) -> list[str] | None:
    """A cycle of the dependency graph as [a, b, ..., a], or None; deterministic by input order."""
    done: set[str] = set()
    for start in graph:
        if start in done:
            continue
        path: list[str] = []
        on_path: set[str] = set()
        stack: list[tuple[str, int]] = [(start, 0)]
        while stack:
            node, index = stack.pop()
            if index == 0:
                path.append(node)
                on_path.add(node)
            edges = graph[node]
            if index < len(edges):
                stack.append((node, index + 1))
                following = edges[index]
                if following in on_path:
                    return path[path.index(following):] + [following]
                if following not in done:
                    stack.append((following, 0))
            else:
                path.pop()
                on_path.discard(node)
                done.add(node)
    return None


def _kind(value: Any) -> str:
    return type(value).__name__
