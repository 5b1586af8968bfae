"""Running a prime job through the fabric: read, shard, submit, collect, checkpoint, write.

The job is a client of the master like any other: it streams the input files, keeps a
bounded window of shards in flight (scaled to the live nodes' slots), records each finished
shard and its primes in the local checkpoint, and writes `primes.txt` atomically, now and
then while it runs and once at the end. Task ids are deterministic and carry a
digest of each shard's numbers, so running the same command after a crash submits the same
tasks: finished shards are skipped from the checkpoint, and a shard the master already
finished is taken from its stored outcome; a rerun cut in other shards shares no id with an
earlier run, so it never reuses an outcome computed for other numbers.

Shards travel as numbers (task `primes`, which every node runs) or, when every live node
that tests primes parses ranges (CPython nodes), as line-aligned bytes of the files (task
`primes_range`): then the nodes parse, and the client only cuts the files at line ends.

The job's retained progress says how it ended: `done`, `incomplete` (some shards failed),
`cancelled` (some shards were cancelled, with `master-node cancel`; the others finished),
`failed` (an error stopped it, with the reason) or `interrupted` (SIGINT, or SIGTERM through
`master-node primes`).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import stat
import time
from concurrent.futures import FIRST_COMPLETED, Future
from concurrent.futures import wait as wait_futures
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from core.errors import ConfigError, FabricError, FabricTimeout, QueueFull
from core import states
from core.protocol import DEFAULT_PRIORITY, MAX_PRIORITY, MIN_PRIORITY, TaskOutcome
from core.topics import validate_id
from master.primes_job.checkpoint import Checkpoint
from master.primes_job.feeder import Feeder, StaleCheckpoint, Submitted, Window
from master.primes_job.numbers import BadLine, read_numbers
from master.primes_job.output import write_primes
from master.primes_job.plan import (RANGES, TASK_NAME, Shard, ShardPlan, iter_shards,
                                    job_id_for, live_nodes, plan_shards, shard_form, window_for)
from master.primes_job.progress import JobProgress
from master.primes_job.ranges import RangeShard, iter_range_shards, range_result

__all__ = ["PrimesJobOptions", "JobSummary", "PrimesJob", "run_primes_job", "check_files",
           "TASK_NAME"]

log = logging.getLogger(__name__)

_POLL = 0.25                 # longest wait for a result before the loop looks around
_OUTCOME_POLL = 5.0          # ask the master directly about shards in flight this long
_NODES_REFRESH = 5.0         # look for new nodes (a bigger window) this often
_PUBLISH_EVERY = 1.0
# Finished shards are committed to the checkpoint this often: a crash loses at most this much
# bookkeeping, and those shards come back from the master's outcomes on the rerun.
_COMMIT_EVERY = 0.2
_RETRY_DELAY = 1.0
_NO_NODE_RETRY_DELAY = 5.0   # no live node runs `primes` right now: give one time to come
_BAD_SAMPLES = 20


@dataclass(frozen=True)
class PrimesJobOptions:
    """What to read, where to write, and the bounds of every wait."""

    files: tuple[Path, ...]
    output: Path = Path("primes.txt")
    checkpoint: Path | None = None       # default: <output>.checkpoint
    job_id: str | None = None            # default: from the files' paths, sizes, mtimes
    shard_size: int | None = None        # default: from the live nodes (plan_shards)
    priority: int = DEFAULT_PRIORITY
    timeout: float = 10.0                # for the master to answer / a node to appear
    stall_timeout: float = 300.0         # give up when no shard finishes for this long
    retries: int = 2                     # new attempts of a failed shard in one run
    flush_interval: float = 5.0          # rewrite the output this often while running
    keep_checkpoint: bool = False        # keep it after a complete run
    publish_progress: bool = True        # retained JSON on <root>/jobs/<job_id>/progress

    @property
    def checkpoint_path(self) -> Path:
        return self.checkpoint or Path(str(self.output) + ".checkpoint")


@dataclass
class JobSummary:
    """What a finished (or given-up) job did."""

    job_id: str
    output: str
    files: list[str]
    complete: bool
    resumed: bool
    numbers_read: int = 0
    numbers_tested: int = 0
    bad_lines: int = 0
    primes: int = 0
    shards: int = 0
    shards_run: int = 0                  # run by nodes in this run
    shards_from_checkpoint: int = 0      # done by an earlier run, kept in the checkpoint
    shards_from_master: int = 0          # finished by the master before this run asked
    shards_failed: int = 0
    retries: int = 0
    seconds: float = 0.0
    rate: float = 0.0                    # numbers run now per second
    nodes: dict[str, int] = field(default_factory=dict)  # shards each node ran in this run
    plan: dict[str, int] = field(default_factory=dict)
    failed: list[dict] = field(default_factory=list)
    bad_line_samples: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_files(files: Sequence[Path]) -> tuple[Path, ...]:
    """The input files, each an existing readable regular file; ConfigError names the rest."""
    if not files:
        raise ConfigError("no input files given")
    problems = []
    for path in files:
        try:
            st = os.stat(path)
        except OSError as e:
            problems.append(f"{path}: {e.strerror or e}")
            continue
        if not stat.S_ISREG(st.st_mode):
            problems.append(f"{path}: not a regular file")
        elif not os.access(path, os.R_OK):
            problems.append(f"{path}: not readable")
    if problems:
        raise ConfigError("cannot read the input: " + "; ".join(problems))
    return tuple(Path(p) for p in files)


class PrimesJob:
    """One run of a prime job over `client` (a started FabricClient).

    A feeder thread reads and submits shards within the window; this thread collects the
    outcomes, checkpoints them, retries failed shards, reports progress and writes the output.
    """

    def __init__(self, client: Any, options: PrimesJobOptions, *,
                 on_bad_line: Callable[[BadLine], None] | None = None,
                 on_progress: Callable[[JobProgress], None] | None = None,
                 on_notice: Callable[[str], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not MIN_PRIORITY <= options.priority <= MAX_PRIORITY:
            raise ConfigError(f"priority must be {MIN_PRIORITY}-{MAX_PRIORITY}")
        if options.timeout <= 0 or options.stall_timeout <= 0 or options.retries < 0:
            raise ConfigError("timeouts must be positive and retries 0 or more")
        self.client = client
        self.options = options
        self._on_bad_line = on_bad_line
        self._on_progress = on_progress
        self._on_notice = on_notice or (lambda text: log.info("%s", text))
        self._clock = clock
        self.job_id = ""
        self.files: tuple[Path, ...] = ()
        self.bytes_total = 0
        self.bytes_read = 0
        self.numbers_tested = 0
        self.numbers_parsed = 0       # read by nodes from range shards finished in this run
        self.shards_cancelled = 0
        self.bad_lines = 0
        self.bad_samples: list[str] = []
        self.primes = 0
        self.shards_done = 0          # finished in this run: run now or from the master
        self.shards_from_master = 0
        self.nodes_run: dict[str, int] = {}
        self.numbers_run = 0          # tested by nodes in this run
        self.retries_done = 0
        self.failed: list[dict] = []
        self._in_flight: dict[Future, Submitted] = {}
        self._retries_used: dict[int, int] = {}
        self._feeder: Feeder | None = None
        self._started = 0.0

    # -- the run -----------------------------------------------------------------------------------

    def run(self) -> JobSummary:
        """Run the job to its end; FabricError (with the reason) when it cannot go on."""
        options = self.options
        self._started = self._clock()
        self.files = check_files(options.files)
        self.bytes_total = sum(os.stat(p).st_size for p in self.files)
        self.job_id = (validate_id(options.job_id, what="job id") if options.job_id
                       else job_id_for(self.files))
        try:
            return self._run()
        except KeyboardInterrupt:
            self._end("interrupted", "stopped by a signal; run the same command again to resume")
            raise
        except BaseException as e:
            self._end("failed", str(e) or type(e).__name__)
            raise

    def _end(self, state: str, reason: str) -> None:
        """Say on the progress topic (and to the hook) how the job ended early."""
        if self._on_progress is not None:
            self._on_progress(self.progress(state, reason=reason))
        self._publish(state, reason=reason)

    def _run(self) -> JobSummary:
        options = self.options
        nodes = self._wait_for_nodes()
        checkpoint = Checkpoint(options.checkpoint_path)
        complete = False
        try:
            plan, resumed = self._resume_or_begin(checkpoint, nodes)
            if plan.form == RANGES:
                shards: Any = iter_range_shards(self.files, plan, self._bad_line,
                                                on_bytes=self._count_bytes)
            else:
                shards = iter_shards(read_numbers(self.files, on_bytes=self._count_bytes), plan,
                                     self._bad_line)
            feeder = self._feeder = Feeder(
                self.client, shards, job_id=self.job_id, task_name=plan.task_name,
                priority=options.priority, window=Window(window_for(nodes)),
                done_before=checkpoint.done_shards(), attempts=checkpoint.attempts(),
                done_counts=checkpoint.done_counts(), ack_timeout=options.timeout,
                clock=self._clock)
            feeder.start()
            try:
                self._loop(checkpoint, feeder)
            except StaleCheckpoint as e:
                checkpoint.begin(self.job_id, plan, files=[str(p) for p in self.files])
                raise ConfigError(f"{e}, though the files' sizes and times are unchanged: "
                                  f"checkpoint {checkpoint.path} no longer matches the input and "
                                  "was emptied; run the same command again") from e
            finally:
                feeder.stop()
            checkpoint.commit()
            self.failed = [{"shard": s, "error": e} for s, e in checkpoint.failed_shards()]
            complete = not self.failed
            write_primes(checkpoint.iter_primes(), options.output)
            summary = self._summary(plan, resumed, complete)
            state = "done" if complete else "cancelled" if self.shards_cancelled else "incomplete"
            self._publish(state)
            if self._on_progress is not None:
                self._on_progress(self.progress(state))
        finally:
            checkpoint.commit()
            if complete and not options.keep_checkpoint:
                checkpoint.remove()
            else:
                checkpoint.close()
        return summary

    def _wait_for_nodes(self) -> list[dict]:
        """The master's nodes once one is live; bounded by the timeout."""
        deadline = self._clock() + self.options.timeout
        while True:
            nodes = self.client.nodes(timeout=max(1.0, deadline - self._clock()))
            if live_nodes(nodes):
                return nodes
            if self._clock() >= deadline:
                raise FabricError(f"no compute node is connected to the master after "
                                  f"{self.options.timeout:g}s: start one with `compute-node "
                                  f"--broker URL` (same --root)")
            time.sleep(0.2)  # polling the master, bounded by the deadline above

    def _resume_or_begin(self, checkpoint: Checkpoint, nodes: list[dict]) -> tuple[ShardPlan, bool]:
        options = self.options
        if checkpoint.reset_reason:
            self._on_notice(f"checkpoint {checkpoint.path} was emptied: {checkpoint.reset_reason}")
        plan = checkpoint.plan()
        if checkpoint.job_id() == self.job_id and plan is not None:
            if options.shard_size and options.shard_size != plan.shard_size:
                raise ConfigError(
                    f"checkpoint {checkpoint.path} holds job {self.job_id} cut in shards of "
                    f"{plan.shard_size}: rerun with --shard-size {plan.shard_size} to resume it, "
                    "or remove the checkpoint to start again")
            self.primes = checkpoint.primes_count()
            self._on_notice(f"resuming job {self.job_id}: {len(checkpoint.done_shards())} shards "
                            f"already done, {self.primes:,} primes found so far "
                            f"({checkpoint.path})")
            return plan, True
        if checkpoint.job_id() is not None:
            self._on_notice(f"checkpoint {checkpoint.path} belonged to job {checkpoint.job_id()} "
                            f"(other input); starting job {self.job_id} afresh")
        plan = plan_shards(nodes, shard_size=options.shard_size, form=shard_form(nodes))
        checkpoint.begin(self.job_id, plan, files=[str(p) for p in self.files])
        return plan, False

    def _loop(self, checkpoint: Checkpoint, feeder: Feeder) -> None:
        options = self.options
        now = self._clock()
        last_finish = now
        next_poll = now + _OUTCOME_POLL
        next_nodes = now + _NODES_REFRESH
        next_publish = now
        next_flush = now + options.flush_interval
        written_primes = self.primes
        committed = now
        while True:
            if feeder.error is not None:
                raise feeder.error
            self._take_submitted(feeder, block=not self._in_flight and not feeder.finished)
            if not self._in_flight and feeder.finished:
                return
            done: set = set()
            if self._in_flight:
                done, _ = wait_futures(list(self._in_flight), timeout=_POLL,
                                       return_when=FIRST_COMPLETED)
            now = self._clock()
            for future in done:
                self._finish(checkpoint, feeder, self._in_flight.pop(future))
            if done:
                if now - committed >= _COMMIT_EVERY:
                    checkpoint.commit()
                    committed = now
                last_finish = now
            elif not self._in_flight:
                last_finish = now  # waiting on reading or retries, not on nodes
            elif now - last_finish > options.stall_timeout:
                raise FabricTimeout(
                    f"no shard finished in {options.stall_timeout:g}s with "
                    f"{len(self._in_flight)} in flight: are the master and the compute "
                    "nodes running? "
                    "(run the same command again to resume)")
            if now >= next_poll:
                self._poll_outcomes(now)
                next_poll = now + _OUTCOME_POLL
            if now >= next_nodes:
                self._refresh_window(feeder)
                next_nodes = now + _NODES_REFRESH
            if now >= next_publish:
                self._publish()
                next_publish = now + _PUBLISH_EVERY
            if self._on_progress is not None:
                self._on_progress(self.progress())
            if now >= next_flush and self.primes != written_primes:
                began = self._clock()
                write_primes(checkpoint.iter_primes(), options.output)
                written_primes = self.primes
                took = self._clock() - began
                next_flush = self._clock() + max(options.flush_interval, 20 * took)

    def _take_submitted(self, feeder: Feeder, *, block: bool) -> None:
        """Move what the feeder submitted into the set waited on."""
        try:
            item = feeder.submitted.get(timeout=_POLL) if block else feeder.submitted.get_nowait()
            while True:
                self._in_flight[item.handle.future] = item
                item = feeder.submitted.get_nowait()
        except queue.Empty:
            pass

    # -- results -----------------------------------------------------------------------------------

    def _finish(self, checkpoint: Checkpoint, feeder: Feeder, slot: Submitted) -> None:
        feeder.window.release()
        shard = slot.shard
        try:
            outcome = slot.handle.outcome(0)
        except QueueFull:
            feeder.retry(shard, slot.digest, slot.attempt, _RETRY_DELAY)
            return
        except FabricError as e:
            outcome = TaskOutcome(id=slot.handle.id, state=states.FAILED,
                                  error={"kind": "error", "message": str(e)})
        if outcome.state == states.COMPLETED:
            try:
                found, count, bad = self._found(shard, outcome.value)
            except ValueError as e:
                error = {"kind": "bad_result", "message": str(e)}
            else:
                self.primes += checkpoint.record_done(shard.index, slot.attempt, slot.digest,
                                                      count, found, outcome.node_id, bad=bad)
                self.shards_done += 1
                if slot.reused:
                    self.shards_from_master += 1
                else:
                    node = outcome.node_id or "?"
                    self.nodes_run[node] = self.nodes_run.get(node, 0) + 1
                    self.numbers_run += count
                self.numbers_tested += count
                feeder.settled()
                return
        elif outcome.state == states.CANCELLED:
            self._cancelled(checkpoint, feeder, slot, outcome)
            return
        else:
            error = dict(outcome.error or {"kind": outcome.state, "message": ""})
        self._failed_attempt(checkpoint, feeder, slot, error)

    def _found(self, shard: Shard | RangeShard, value: Any) -> tuple[list, int, int]:
        """The primes a node found in `shard`, its count of numbers and of bad lines (named
        here for a range, whose lines only the node parsed); ValueError for a bad answer."""
        if isinstance(shard, Shard):
            return _primes_of(shard, value), len(shard.numbers), 0
        result = range_result(shard, value)
        for bad in result.bad_lines:
            self._bad_line(bad)
        self.bad_lines += result.bad - len(result.bad_lines)  # counted, not named
        self.numbers_parsed += result.numbers
        return result.primes, result.numbers, result.bad

    def _cancelled(self, checkpoint: Checkpoint, feeder: Feeder, slot: Submitted,
                   outcome: TaskOutcome) -> None:
        """Someone cancelled the shard's task: it is settled for this run, not retried (a
        rerun submits it again, under its next attempt's id)."""
        index = slot.shard.index
        message = str((outcome.error or {}).get("message", "")) or "cancelled"
        checkpoint.record_attempt(index, slot.attempt + 1, failed=True,
                                  error=f"cancelled: {message}")
        self.shards_cancelled += 1
        feeder.settled()
        self._on_notice(f"shard {index} was cancelled ({message}); not run in this run")

    def _failed_attempt(self, checkpoint: Checkpoint, feeder: Feeder, slot: Submitted,
                        error: dict) -> None:
        index = slot.shard.index
        attempt = slot.attempt + 1  # a new task id: the master keeps the failed one as failed
        kind = str(error.get("kind", "error"))
        reason = f"{kind}: {error.get('message', '')}"
        used = self._retries_used.get(index, 0)
        if used < self.options.retries:
            self._retries_used[index] = used + 1
            self.retries_done += 1
            checkpoint.record_attempt(index, attempt, failed=False, error=reason)
            delay = _NO_NODE_RETRY_DELAY if kind == "unknown_task" else _RETRY_DELAY
            feeder.retry(slot.shard, slot.digest, attempt, delay)
            self._on_notice(f"shard {index} failed ({reason}); trying again "
                            f"({used + 1} of {self.options.retries})")
            return
        checkpoint.record_attempt(index, attempt, failed=True, error=reason)
        feeder.settled()
        self._on_notice(f"shard {index} failed ({reason}); giving up on it in this run")

    def _poll_outcomes(self, now: float) -> None:
        """Ask the master about shards in flight for a while: one submitted by an earlier
        run of the job reports to that run's client, so this run asks for it."""
        slots = {s.handle.id: s for s in self._in_flight.values()
                 if now - s.submitted >= _OUTCOME_POLL}
        if not slots:
            return
        try:
            data = self.client.query("outcomes", {"ids": list(slots)[:1000]}, timeout=2.0)
        except FabricError as e:
            log.debug("outcome poll failed: %s", e)
            return
        for item in data or []:
            try:
                outcome = TaskOutcome.from_dict(item)
            except FabricError:
                continue
            slot = slots.get(outcome.id)
            if slot is not None and outcome.state in states.FINAL_STATES:
                slot.handle.resolve(outcome)

    def _refresh_window(self, feeder: Feeder) -> None:
        try:
            nodes = self.client.nodes(timeout=2.0)
        except FabricError:
            return  # the master is restarting: keep the window we have
        if live_nodes(nodes):
            feeder.window.resize(window_for(nodes))

    # -- counters ----------------------------------------------------------------------------------

    def _count_bytes(self, size: int) -> None:
        self.bytes_read += size

    def _bad_line(self, bad: BadLine) -> None:
        """Called on the feeder's thread."""
        self.bad_lines += 1
        if len(self.bad_samples) < _BAD_SAMPLES:
            self.bad_samples.append(str(bad))
        if self._on_bad_line is not None:
            self._on_bad_line(bad)

    def progress(self, state: str = "running", *, reason: str = "") -> JobProgress:
        feeder = self._feeder
        numbers_read = (feeder.numbers_read if feeder else 0) + self.numbers_parsed
        skipped = feeder.numbers_skipped if feeder else 0
        from_checkpoint = feeder.shards_skipped if feeder else 0
        shards_total = feeder.shards_seen if feeder and feeder.reader_done else None
        return JobProgress(job_id=self.job_id, state=state, numbers_read=numbers_read,
                           numbers_tested=self.numbers_tested + skipped,
                           bad_lines=self.bad_lines + (feeder.bad_skipped if feeder else 0),
                           shards_done=self.shards_done + from_checkpoint,
                           shards_total=shards_total, shards_in_flight=len(self._in_flight),
                           shards_reused=self.shards_from_master + from_checkpoint,
                           primes=self.primes, bytes_read=self.bytes_read,
                           bytes_total=self.bytes_total, elapsed=self._clock() - self._started,
                           reason=reason)

    def _publish(self, state: str = "running", *, reason: str = "") -> None:
        """The job's progress, retained, for MQTT Explorer and dashboards. The client
        publishes it (the master does not know the job); with a locked-down ACL, grant
        clients `pattern write <root>/jobs/#` or the broker drops it."""
        if not self.options.publish_progress or not self.job_id:
            return
        payload = json.dumps(self.progress(state, reason=reason).to_dict(),
                             separators=(",", ":")).encode()
        try:
            self.client.publish(self.client.topics.job_progress(self.job_id), payload, retain=True)
        except FabricError as e:
            log.debug("progress not published: %s", e)

    def _summary(self, plan: ShardPlan, resumed: bool, complete: bool) -> JobSummary:
        seconds = self._clock() - self._started
        feeder = self._feeder
        assert feeder is not None
        tested = self.numbers_tested + feeder.numbers_skipped
        return JobSummary(
            job_id=self.job_id, output=str(self.options.output),
            files=[str(p) for p in self.files], complete=complete, resumed=resumed,
            numbers_read=feeder.numbers_read + self.numbers_parsed, numbers_tested=tested,
            bad_lines=self.bad_lines + feeder.bad_skipped, primes=self.primes, shards=feeder.shards_seen,
            shards_run=self.shards_done - self.shards_from_master,
            shards_from_checkpoint=feeder.shards_skipped,
            shards_from_master=self.shards_from_master, shards_failed=len(self.failed),
            retries=self.retries_done, seconds=round(seconds, 3),
            rate=round(self.numbers_run / seconds, 1) if seconds > 0 else 0.0,
            nodes=dict(sorted(self.nodes_run.items())), plan=plan.to_dict(), failed=self.failed,
            bad_line_samples=list(self.bad_samples))


def _primes_of(shard: Shard, value: Any) -> list[int]:
    """The shard's numbers at the indices a node returned; ValueError for a malformed answer."""
    if not isinstance(value, list):
        raise ValueError(f"expected a list of indices, got {type(value).__name__}")
    numbers = shard.numbers
    size = len(numbers)
    out = []
    for index in value:
        if type(index) is not int or not 0 <= index < size:
            raise ValueError(f"index {index!r} is outside the shard of {size} numbers")
        out.append(numbers[index])
    return out


def run_primes_job(client: Any, options: PrimesJobOptions, **hooks: Any) -> JobSummary:
    """Run a prime job with `client` (a started FabricClient); see PrimesJob for the hooks."""
    return PrimesJob(client, options, **hooks).run()
