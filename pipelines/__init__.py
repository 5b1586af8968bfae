"""Pipelines on the fabric: jobs with dependencies, schedules, state machines and events.

Each job of a pipeline runs as one fabric task. The package itself speaks no MQTT: the master
hands it `run_task` (how to run a task on the fabric), forwards its events, and publishes the
state payloads it computes; a program on its own uses `FabricRunTask` (a fabric client), the
default when no `run_task` is given. A typical wiring:

    events = EventSystem()
    store = VersionedStore("state.sqlite")
    manager = PipelineManager.from_file("pipelines.toml", events, run_task=run_task,
                                        store=store, known_tasks=registered_task_names)
    events.add_listener(forward_event_to_mqtt)                 # (event_name, data)
    manager.add_state_listener(publish_retained_pipeline_state)  # (name, payload)
    await manager.run_forever(stop_event, poll_interval=1.0)
"""

from pipelines.config import (DEFAULT_TIMEOUT, INPUTS_KWARG, METADATA_KWARG, JobConfig,
                              PipelineConfig, load_pipelines, parse_pipeline_data,
                              parse_pipelines)
from pipelines.errors import (IllegalTransition, JobFailed, PipelineBusy, PipelineConfigError,
                              PipelineError, ScheduleError, StoreError, TransactionConflict,
                              TransactionError, UnknownPipeline, UnknownRun)
from pipelines.events import (EVENT_NAMES, JOB_COMPLETED, JOB_FAILED, JOB_RETRYING, JOB_STARTED,
                              PIPELINE_COMPLETED, PIPELINE_FAILED, PIPELINE_PAUSED,
                              PIPELINE_RESUMED, PIPELINE_STARTED, EventSystem)
from pipelines.executor import MANUAL, PipelineExecutor, RunTask
from pipelines.fabric_runner import FabricRunTask
from pipelines.manager import SCHEDULED_TRIGGER, Due, IntervalSchedule, PipelineManager
from pipelines.models import JobModel, PipelineModel, Staged
from pipelines.schedule import next_run
from pipelines.state_topic import pipeline_state_payload
from pipelines.states import (COMPLETED, FAILED, JOB_STATES, JOB_TRANSITIONS, PAUSED, PENDING,
                              PIPELINE_STATES, PIPELINE_TRANSITIONS, RUNNING, SCHEDULED,
                              StateMachine, job_state_machine, pipeline_state_machine)
from pipelines.store import (JobRun, RunRecord, Transaction, Version, VersionedStore,
                             default_store)
from pipelines.timestrings import parse_time_string

__all__ = [
    # time strings and schedules
    "parse_time_string", "next_run",
    # events
    "EventSystem", "EVENT_NAMES", "JOB_STARTED", "JOB_COMPLETED", "JOB_FAILED", "JOB_RETRYING",
    "PIPELINE_STARTED", "PIPELINE_COMPLETED", "PIPELINE_FAILED", "PIPELINE_PAUSED",
    "PIPELINE_RESUMED",
    # states
    "StateMachine", "pipeline_state_machine", "job_state_machine", "SCHEDULED", "PENDING",
    "RUNNING", "PAUSED", "COMPLETED", "FAILED", "PIPELINE_STATES", "PIPELINE_TRANSITIONS",
    "JOB_STATES", "JOB_TRANSITIONS",
    # storage and models
    "VersionedStore", "Transaction", "Version", "RunRecord", "JobRun", "PipelineModel",
    "JobModel", "Staged", "default_store",
    # configuration
    "PipelineConfig", "JobConfig", "load_pipelines", "parse_pipelines", "parse_pipeline_data",
    "DEFAULT_TIMEOUT",
    "INPUTS_KWARG", "METADATA_KWARG",
    # running
    "PipelineExecutor", "RunTask", "MANUAL", "PipelineManager", "Due", "SCHEDULED_TRIGGER",
    "IntervalSchedule", "FabricRunTask",
    "pipeline_state_payload",
    # errors
    "PipelineError", "ScheduleError", "PipelineConfigError", "IllegalTransition",
    "TransactionConflict", "TransactionError", "StoreError", "JobFailed", "PipelineBusy",
    "UnknownPipeline", "UnknownRun",
]
