"""`master-node pipelines`: list, run, pause, resume a running master's pipelines; their history;
submit a pipelines file for one run without restarting the master."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from core.errors import FabricError
from master.commands.common import add_client_options, connect
from master.tables import format_age, format_table

NAME = "pipelines"
HELP = "list, run, pause and resume pipelines; show their history; submit one-off pipelines"
DESCRIPTION = ("Drive the pipelines of a master (those of `master-node serve --pipelines FILE` "
               "and those submitted), through the broker. `list` shows every pipeline's state, "
               "`run NAME` starts a run now, `pause NAME` stops its schedules and lets the jobs "
               "under way finish (the run waits), `resume NAME` continues it, `history NAME` "
               "shows the latest runs with every job's state, attempts, result or error, and "
               "`submit FILE` runs the pipelines of a file once, now, on a running master.")

_QUERY = "pipelines"
_PREVIEW = 48


def add_arguments(p: argparse.ArgumentParser) -> None:
    ops = p.add_subparsers(dest="op", required=True, metavar="OPERATION")
    listing = ops.add_parser("list", help="every pipeline: state, current run, last result, "
                                          "next scheduled run",
                             description="Show every pipeline of the master: its state, the run "
                                         "in progress (jobs done/total), the outcome of the last "
                                         "run and when its schedule fires next.")
    run = ops.add_parser("run", help="start a run of a pipeline now",
                         description="Start a run of the pipeline now. Refused while it is "
                                     "running or paused.")
    run.add_argument("--job", dest="jobs", action="append", metavar="JOB",
                     help="run only this job (repeatable; its dependencies outside the run "
                          "give their latest results)")
    pause = ops.add_parser("pause", help="stop a pipeline's schedules and its run",
                           description="Pause the pipeline: no schedule fires and no new job "
                                       "starts; jobs already running finish and the run waits "
                                       "as Paused, across master restarts, until resumed.")
    resume = ops.add_parser("resume", help="undo pause: the paused run continues",
                            description="Resume the pipeline: a paused run continues at once; "
                                        "schedules fire next one interval from now.")
    history = ops.add_parser("history", help="the latest runs of a pipeline, job by job",
                             description="Show the latest runs of the pipeline, newest first, "
                                         "with every job's state, attempts and result or error.")
    history.add_argument("--limit", type=int, default=10, metavar="N",
                         help="how many runs (default %(default)s)")
    submit = ops.add_parser("submit", help="run the pipelines of a file once, now",
                            description="Run each pipeline of FILE (the TOML of serve "
                                        "--pipelines, without schedules) once, now, on the "
                                        "running master; no restart. The file is checked here, "
                                        "its task names by the master, which knows its nodes. "
                                        "Follow the runs with `history NAME`.")
    submit.add_argument("file", type=Path, metavar="FILE", help="a pipelines TOML file")
    for sub in (run, pause, resume, history):
        sub.add_argument("name", metavar="NAME", help="the pipeline's name")
    for sub in (listing, run, pause, resume, history, submit):
        sub.add_argument("--json", action="store_true", help="print JSON instead of text")
        add_client_options(sub)


def run(args: argparse.Namespace) -> int:
    if args.op == "submit":
        return _submit(args)
    params: dict[str, Any] = {"op": args.op}
    if args.op != "list":
        params["name"] = args.name
    if args.op == "run" and args.jobs:
        params["jobs"] = list(args.jobs)
    if args.op == "history":
        params["limit"] = args.limit
    client = connect(args)
    try:
        answer = client.query(_QUERY, params, timeout=args.timeout)
    except FabricError as e:
        if str(e).startswith(f"unknown query '{_QUERY}'"):
            raise FabricError("this master does not run pipelines (it predates them)") from e
        raise
    finally:
        client.close()
    if args.json:
        print(json.dumps(answer, indent=2))
        return 0
    print(_TEXT[args.op](answer))
    return 0


def _submit(args: argparse.Namespace) -> int:
    from master.pipelines_bridge.dispatch import pipeline_data_from_file
    pipelines = pipeline_data_from_file(args.file)  # a bad file is refused before connecting
    client = connect(args)
    try:
        started = []
        for data in pipelines:
            try:
                run_id = client.dispatch_pipeline(data, timeout=args.timeout)
            except FabricError as e:
                if str(e).startswith(f"unknown query '{_QUERY}'"):
                    raise FabricError("this master does not run pipelines (it predates "
                                      "them, or it is a replica)") from e
                raise
            started.append({"pipeline": data["name"], "run_id": run_id})
    finally:
        client.close()
    if args.json:
        print(json.dumps(started, indent=2))
    else:
        print("\n".join(_run_text(answer) for answer in started))
    return 0


def _list_text(states: list[dict[str, Any]]) -> str:
    if not states:
        return ("no pipelines (give `master-node serve --pipelines FILE`, or run one with "
                "`master-node pipelines submit FILE`)")
    rows = []
    for s in states:
        jobs = f"{s.get('jobs_done', 0)}/{s.get('jobs_total', 0)}"
        if s.get("jobs_failed"):
            jobs += f" ({s['jobs_failed']} failed)"
        rows.append((s["pipeline"], s["state"], _short(s.get("run_id")), jobs,
                     s.get("last_result") or "-", format_age(s.get("last_finished_at") or 0),
                     _until(s.get("next_run_at"))))
    return format_table(("PIPELINE", "STATE", "RUN", "JOBS", "LAST RESULT", "LAST FINISHED",
                         "NEXT RUN"), rows)


def _run_text(answer: dict[str, Any]) -> str:
    return f"started run {answer['run_id']} of pipeline {answer['pipeline']}"


def _pause_text(state: dict[str, Any]) -> str:
    line = f"pipeline {state['pipeline']} is {state['state']}"
    if state.get("run_id") and state.get("run_started_at"):
        line += (f"; run {_short(state['run_id'])} waits with {state['jobs_done']}/"
                 f"{state['jobs_total']} jobs done (jobs under way still finish)")
    return line


def _resume_text(answer: dict[str, Any]) -> str:
    line = f"pipeline {answer['pipeline']} is {answer['state']}"
    if answer.get("continued_run_id"):
        line += f"; run {answer['continued_run_id']} continues"
    if answer.get("next_run_at"):
        line += f"; next scheduled run {_until(answer['next_run_at'])}"
    return line


def _history_text(runs: list[dict[str, Any]]) -> str:
    if not runs:
        return "no runs yet"
    blocks = []
    for r in runs:
        head = (f"run {r['run_id']}  {r['state']}  ({r['trigger']})  started "
                f"{format_age(r['started_at'])}")
        if r.get("finished_at"):
            head += f", took {_took(r['started_at'], r['finished_at'])}"
        head += f"  jobs {r['jobs_done']}/{r['jobs_total']} done"
        lines = [head]
        if r.get("error"):
            lines.append(f"  error: {r['error']}")
        rows = [(j["job"], j["state"], j["attempts"], _took(j["started_at"], j["finished_at"]),
                 _outcome(j)) for j in r["jobs"]]
        table = format_table(("JOB", "STATE", "ATTEMPTS", "TOOK", "RESULT / ERROR"), rows)
        lines.extend("  " + line for line in table.splitlines())
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


_TEXT = {"list": _list_text, "run": _run_text, "pause": _pause_text, "resume": _resume_text,
         "history": _history_text}


def _outcome(job: dict[str, Any]) -> str:
    if job.get("error"):
        return _cut(str(job["error"]), 100)
    if job["state"] != "Completed":
        return ""
    return _cut(json.dumps(job.get("result")) if not job.get("result_truncated")
                else str(job["result"]), _PREVIEW)


def _short(run_id: str | None) -> str:
    return run_id[:8] if run_id else "-"


def _until(ts: float | None, now: float | None = None) -> str:
    if not ts:
        return "-"
    left = ts - (time.time() if now is None else now)
    if left <= 0:
        return "due"
    if left < 120:
        return f"in {left:.0f}s"
    if left < 7200:
        return f"in {left / 60:.0f}m"
    return f"in {left / 3600:.0f}h"


def _took(start: float | None, end: float | None) -> str:
    if start is None or end is None:
        return "-"
    return f"{max(0.0, end - start):.2f}s"


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 3] + "..."
