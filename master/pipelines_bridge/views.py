"""Pipeline runs as the plain dicts the `pipelines` query answers with (and `--json` prints).

Results can be anything a task returned, so a reply carries a result whole only while it is
small; a bigger one is replaced by a one-line description and `result_truncated` is set. The
full value stays in the pipeline store, and the next job received it whole.
"""

from __future__ import annotations

import json
from typing import Any

from pipelines import JobRun, RunRecord

__all__ = ["run_view", "job_view", "MAX_RESULT_CHARS"]

MAX_RESULT_CHARS = 2000


def run_view(run: RunRecord) -> dict[str, Any]:
    """One run: its state, trigger, times, error, counts and every job."""
    return {
        "run_id": run.run_id,
        "pipeline": run.pipeline,
        "state": run.state,
        "trigger": run.trigger,
        "started_at": run.started_at,
        "finished_at": run.finished_at,
        "error": run.error,
        "jobs_done": run.jobs_done,
        "jobs_failed": run.jobs_failed,
        "jobs_total": run.jobs_total,
        "jobs": [job_view(job) for job in run.jobs.values()],
    }


def job_view(job: JobRun) -> dict[str, Any]:
    """One job of a run, with its result bounded to `MAX_RESULT_CHARS` of JSON."""
    result, truncated = _bounded(job.result)
    return {
        "job": job.name,
        "state": job.state,
        "attempts": job.attempts,
        "error": job.error,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
        "result": result,
        "result_truncated": truncated,
    }


def _bounded(value: Any) -> tuple[Any, bool]:
    try:
        text = json.dumps(value, separators=(",", ":"))
    except (TypeError, ValueError):
        return repr(value)[:200], True
    if len(text) <= MAX_RESULT_CHARS:
        return value, False
    size = f"{len(value)} items, " if isinstance(value, (list, dict)) else ""
    return f"<{type(value).__name__}: {size}{len(text)} characters of JSON>", True
