"""Pipeline files: a valid file loads into frozen configs; each mistake is named precisely."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from pipelines import (DEFAULT_TIMEOUT, JobConfig, PipelineConfig, PipelineConfigError,
                       load_pipelines)

VALID = """
[master]                    # other parts of the fabric may share the file
broker = "mqtt://localhost"

[pipelines.etl]
schedule = "5m"
metadata = "load_meta"

[pipelines.etl.jobs.extract]
task = "echo"
args = [1, "two", [3]]
kwargs = {mode = "fast"}
priority = 7
retries = 2
timeout = "30s"
schedule = "10m"

[pipelines.etl.jobs.transform]
task = "double"
depends_on = ["extract"]
timeout = 2.5

[pipelines.etl.jobs.load]
task = "echo"
depends_on = ["transform", "extract"]

[pipelines.primes.jobs.find]
task = "primes_in_range"
args = [1, 1000]
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pipelines.toml"
    path.write_text(text)
    return path


def test_a_valid_file_loads_with_values_and_defaults(tmp_path: Path) -> None:
    etl, primes = load_pipelines(write(tmp_path, VALID),
                                 known_tasks={"echo", "double", "load_meta", "primes_in_range"})
    assert (etl.name, etl.schedule, etl.interval, etl.metadata) == ("etl", "5m", 300, "load_meta")
    assert etl.job_names == ("extract", "transform", "load")
    extract = etl.job("extract")
    assert extract.args == (1, "two", [3])
    assert dict(extract.kwargs) == {"mode": "fast"}
    assert (extract.priority, extract.retries, extract.timeout) == (7, 2, 30.0)
    assert (extract.schedule, extract.interval) == ("10m", 600)
    assert etl.job("transform").timeout == 2.5
    assert etl.job("load").depends_on == ("transform", "extract")
    find = primes.job("find")
    assert (find.priority, find.retries, find.timeout, find.depends_on, find.schedule) == (
        5, 0, DEFAULT_TIMEOUT, (), None)
    assert primes.schedule is None and primes.interval is None


def test_configs_are_frozen(tmp_path: Path) -> None:
    etl = load_pipelines(write(tmp_path, VALID))[0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        etl.name = "other"  # type: ignore[misc]
    with pytest.raises(TypeError):
        etl.job("extract").kwargs["mode"] = "slow"  # type: ignore[index]


JOB = '[pipelines.p.jobs.j]\ntask = "echo"\n'


@pytest.mark.parametrize("text, pipeline, job, field, message", [
    # unknown dependency
    (JOB + 'depends_on = ["missing"]\n', "p", "j", "depends_on", "unknown job 'missing'"),
    # cycles, named in order
    ('[pipelines.p.jobs.a]\ntask = "echo"\ndepends_on = ["b"]\n'
     '[pipelines.p.jobs.b]\ntask = "echo"\ndepends_on = ["c"]\n'
     '[pipelines.p.jobs.c]\ntask = "echo"\ndepends_on = ["a"]\n',
     "p", "a", "depends_on", "dependency cycle: a -> b -> c -> a"),
    (JOB + 'depends_on = ["j"]\n', "p", "j", "depends_on", "dependency cycle: j -> j"),
    ('[pipelines.p.jobs.a]\ntask = "echo"\n'
     '[pipelines.p.jobs.b]\ntask = "echo"\ndepends_on = ["a", "c"]\n'
     '[pipelines.p.jobs.c]\ntask = "echo"\ndepends_on = ["b"]\n',
     "p", "b", "depends_on", "dependency cycle: b -> c -> b"),
    (JOB + 'depends_on = "x"\n', "p", "j", "depends_on", "must be an array of job names"),
    (JOB + '[pipelines.p.jobs.k]\ntask = "echo"\ndepends_on = ["j", "j"]\n',
     "p", "k", "depends_on", "lists a job twice"),
    # schedules
    ('[pipelines.p]\nschedule = "5x"\n' + JOB, "p", None, "schedule", "unknown unit 'x'"),
    (JOB + 'schedule = "0m"\n', "p", "j", "schedule", "zero"),
    (JOB + "schedule = 300\n", "p", "j", "schedule", "must be a str"),
    # timeouts
    (JOB + 'timeout = "soon"\n', "p", "j", "timeout", "'s' at position 0 has no number"),
    (JOB + "timeout = 0\n", "p", "j", "timeout", "positive number of seconds"),
    (JOB + "timeout = -1.5\n", "p", "j", "timeout", "positive number of seconds"),
    (JOB + "timeout = true\n", "p", "j", "timeout", "positive number of seconds"),
    (JOB + "timeout = inf\n", "p", "j", "timeout", "positive number of seconds"),
    # priority and retries
    (JOB + "priority = 11\n", "p", "j", "priority", "integer 1-10, got 11"),
    (JOB + "priority = 0\n", "p", "j", "priority", "integer 1-10, got 0"),
    (JOB + 'priority = "high"\n', "p", "j", "priority", "integer 1-10"),
    (JOB + "priority = 5.0\n", "p", "j", "priority", "integer 1-10"),
    (JOB + "priority = true\n", "p", "j", "priority", "integer 1-10"),
    (JOB + "retries = -1\n", "p", "j", "retries", "integer >= 0"),
    # types of args and kwargs
    (JOB.replace('task = "echo"', "task = 5"), "p", "j", "task", "must be a task name"),
    (JOB + 'args = "x"\n', "p", "j", "args", "must be an array"),
    (JOB + "kwargs = [1]\n", "p", "j", "kwargs", "must be a table"),
    (JOB + "args = [1979-05-27]\n", "p", "j", "args", "cannot be sent to a task"),
    (JOB + "kwargs = {when = 07:32:00}\n", "p", "j", "kwargs", "cannot be sent to a task"),
    # reserved keyword arguments
    (JOB + '[pipelines.p.jobs.k]\ntask = "echo"\ndepends_on = ["j"]\nkwargs = {inputs = 1}\n',
     "p", "k", "kwargs", "'inputs' is reserved"),
    ('[pipelines.p]\nmetadata = "meta"\n' + JOB + "kwargs = {metadata = 1}\n",
     "p", "j", "kwargs", "'metadata' is reserved"),
    # unknown keys
    (JOB + "retry = 3\n", "p", "j", "retry", "unknown key"),
    ('[pipelines.p]\ncron = "* * * * *"\n' + JOB, "p", None, "cron", "unknown key"),
    # structure and names
    ('[pipelines.p]\nschedule = "5m"\n', "p", None, "jobs", "has no jobs"),
    ('[pipelines.p]\njobs = 3\n', "p", None, "jobs", "must be a table"),
    ('[pipelines."bad/name".jobs.j]\ntask = "echo"\n', "bad/name", None, None,
     "invalid pipeline name"),
    ('[pipelines.p.jobs."a b"]\ntask = "echo"\n', "p", "a b", None, "invalid job name"),
    ('[pipelines]\np = 3\n', "p", None, None, "must be a table"),
    ('[pipelines.p]\nmetadata = ""\n' + JOB, "p", None, "metadata", "must be a task name"),
])
def test_each_mistake_names_pipeline_job_and_field(tmp_path: Path, text: str, pipeline: str,
                                                   job: str | None, field: str | None,
                                                   message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(PipelineConfigError) as caught:
        load_pipelines(path)
    error = caught.value
    assert (error.pipeline, error.job, error.field) == (pipeline, job, field)
    assert message in str(error)
    where = f"pipelines.{pipeline}" + (f".jobs.{job}" if job else "") + \
        (f".{field}" if field else "")
    assert f"{path}: {where}: " in str(error)


def test_unknown_task_names_are_refused_when_tasks_are_known(tmp_path: Path) -> None:
    path = write(tmp_path, VALID)
    with pytest.raises(PipelineConfigError) as caught:
        load_pipelines(path, known_tasks={"echo", "load_meta", "primes_in_range"})
    assert (caught.value.pipeline, caught.value.job, caught.value.field) == (
        "etl", "transform", "task")
    assert "unknown task 'double'" in str(caught.value)
    with pytest.raises(PipelineConfigError, match="metadata: unknown task 'load_meta'"):
        load_pipelines(path, known_tasks={"echo", "double", "primes_in_range"})


def test_file_level_problems_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(PipelineConfigError, match="cannot read"):
        load_pipelines(tmp_path / "absent.toml")
    with pytest.raises(PipelineConfigError, match="not valid TOML"):
        load_pipelines(write(tmp_path, "[pipelines.p\n"))
    with pytest.raises(PipelineConfigError, match=r"no \[pipelines\] table"):
        load_pipelines(write(tmp_path, "[master]\nx = 1\n"))


def test_configs_built_in_code_are_checked_too() -> None:
    a = JobConfig(name="a", task="echo", depends_on=("b",))
    b = JobConfig(name="b", task="echo", depends_on=("a",))
    with pytest.raises(PipelineConfigError, match="dependency cycle: a -> b -> a") as caught:
        PipelineConfig(name="p", jobs=(a, b))
    assert (caught.value.pipeline, caught.value.job, caught.value.field) == ("p", "a",
                                                                           "depends_on")
    with pytest.raises(PipelineConfigError, match="two jobs are called 'x'"):
        PipelineConfig(name="p", jobs=(JobConfig(name="x", task="t"),) * 2)
    with pytest.raises(PipelineConfigError, match="unknown job 'z'"):
        PipelineConfig(name="p", jobs=(JobConfig(name="x", task="t", depends_on=("z",)),))
    with pytest.raises(PipelineConfigError, match="needs a job"):
        PipelineConfig(name="p", jobs=())


def test_a_pipeline_as_data_is_checked_by_the_same_rules() -> None:
    from pipelines import parse_pipeline_data
    listed = parse_pipeline_data({"name": "etl", "jobs": [
        {"name": "extract", "task": "echo", "args": [1]},
        {"name": "load", "depends_on": ["extract"], "timeout": "30s"}]})
    table = parse_pipeline_data({"jobs": {"extract": {"task": "echo", "args": [1]},
                                          "load": {"depends_on": ["extract"], "timeout": 30}}},
                                name="etl")
    assert listed == table
    assert listed.job("load").task == "load"  # no task: the task of the job's own name
    assert parse_pipeline_data(listed.to_dict()) == listed  # what the store keeps reads back
    with pytest.raises(PipelineConfigError) as unknown:
        parse_pipeline_data({"name": "etl", "jobs": [{"name": "load"}]}, known_tasks={"echo"})
    assert (unknown.value.job, unknown.value.field) == ("load", "task")
    assert "pipelines.etl.jobs.load.task: unknown task 'load' (known tasks: echo)" in \
        str(unknown.value)
    mistakes = [
        ({"name": "etl", "jobs": [{"task": "echo"}]}, "item 0 needs a name"),
        ({"name": "etl", "jobs": [{"name": "a"}, {"name": "a"}]}, "two jobs are called 'a'"),
        ({"name": "etl", "jobs": ["a"]}, "item 0 must be a table"),
        ({"name": "etl", "jobs": []}, "has no jobs"),
        ({"jobs": [{"name": "a"}]}, "a pipeline needs a name"),
        ({"name": "etl", "id": "x", "jobs": [{"name": "a"}]}, "pipelines.etl.id: unknown key"),
        (["etl"], "must be a table"),
    ]
    for data, message in mistakes:
        with pytest.raises(PipelineConfigError, match=re.escape(message)):
            parse_pipeline_data(data)  # type: ignore[arg-type]
    with pytest.raises(PipelineConfigError, match="says 'b'"):
        parse_pipeline_data({"name": "b", "jobs": [{"name": "a"}]}, name="a")
