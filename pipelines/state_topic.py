"""The state of one pipeline as the flat JSON the master publishes, retained, per pipeline.

Flat, dot-free keys and numbers as numbers, so MQTT Explorer shows and charts it as is; times
are seconds since the epoch (floats), absent values are null.
"""

from __future__ import annotations

from typing import Any

from pipelines.store import RunRecord

__all__ = ["pipeline_state_payload"]


def pipeline_state_payload(
    *,
    name: str,
    state: str,
    current: RunRecord | None,
    last: RunRecord | None,
    next_run_at: float | None,
    jobs_total: int,
) -> dict[str, Any]:
    """The payload of a pipeline's state topic.

    `current` is the unfinished (Running or Paused) run, if any; `last` the latest finished run;
    `jobs_total` the number of jobs in the pipeline, used when there is no run to count from.
    Job counts are those of the current run, else of the last one.
    """
    counted = current or last
    return {
        "pipeline": name,
        "state": state,
        "run_id": counted.run_id if counted else None,
        "run_started_at": current.started_at if current else None,
        "jobs_done": counted.jobs_done if counted else 0,
        "jobs_failed": counted.jobs_failed if counted else 0,
        "jobs_total": counted.jobs_total if counted else jobs_total,
        "last_result": last.state if last else None,
        "last_error": last.error if last else None,
        "last_started_at": last.started_at if last else None,
        "last_finished_at": last.finished_at if last else None,
        "next_run_at": next_run_at,
    }
