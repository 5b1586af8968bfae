"""The prime job: exact answers, bad input named, and nothing lost when a process dies.

The pure parts (reading, sharding, planning, the checkpoint, the output) are tested directly;
the job itself runs as a user runs it, `master-node primes` against a real master and real
compute nodes, on the embedded broker and on mosquitto.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import msgpack
import pytest
import sympy
from hypothesis import given, settings
from hypothesis import strategies as st

from core.protocol import make_task
from master.primes_job import (BadLine, Checkpoint, JobProgress, ShardPlan, iter_shards,
                               job_id_for, parse_line, plan_shards, read_numbers,
                               render_progress, task_digest, task_id, window_for, write_primes)
from master.primes_job.numbers import MAX_LINE_BYTES, wire_number, wire_numbers
from master.commands.primes import format_summary
from master.primes_job.plan import DEFAULT_SHARD_SIZE, number_cost
from master.primes_job.runner import JobSummary
from core.url import parse_broker_url
from esp32_support import boards, micropython, umqtt_file  # noqa: F401 (fixtures)
from support.fabric import Fabric, child_env, wait_until
from support.workloads import SLOW_PRIMES

# -- inputs ------------------------------------------------------------------------------------

BIG_PRIMES = [2**89 - 1, 2**127 - 1, 18446744073709551629]  # the last is the first prime > 2**64
TRICKY_COMPOSITES = [
    3825123056546413051,           # strong pseudoprime to bases 2..23
    318665857834031151167461,      # fools the first 12 prime bases
    3317044064679887385961981,     # fools the first 13 prime bases
    561, 41041, 825265,            # Carmichael numbers
    2**64 + 1, (2**61 - 1) * (2**31 - 1),
]


def make_inputs(directory: Path, seed: int = 7, count: int = 600) -> tuple[list[Path], dict]:
    """Three files with duplicates, blank and bad lines, negatives and numbers above 2**64.

    Returns the paths and {"numbers": [...valid numbers...], "bad": [(path, line), ...]}.
    """
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    numbers: list[int] = []
    bad: list[tuple[str, int]] = []
    paths = []
    for index in range(3):
        lines: list[str] = []
        for i in range(count):
            kind = rng.random()
            if kind < 0.4:
                value = rng.randrange(0, 5000)
            elif kind < 0.7:
                value = rng.getrandbits(64)
            elif kind < 0.8:
                value = -rng.randrange(1, 10**6)
            elif kind < 0.9 and numbers:
                value = rng.choice(numbers)          # a duplicate
            else:
                value = rng.getrandbits(rng.choice([70, 100]))
            lines.append(f"  {value} " if i % 97 == 0 else str(value))
            numbers.append(value)
        extras = BIG_PRIMES + TRICKY_COMPOSITES if index == 2 else []
        for value in extras:
            lines.insert(rng.randrange(len(lines)), str(value))
            numbers.append(value)
        for text in ("", "   ", "abc", "12x", "1.5", "0x1f", "1_000"):
            lines.insert(rng.randrange(len(lines)), text)
        path = directory / f"input_{index + 1}.txt"
        path.write_text("\r\n".join(lines) + "\r\n" if index == 1 else "\n".join(lines) + "\n")
        bad += [(str(path), line_no) for line_no, text in enumerate(lines, 1)
                if isinstance(parse_line(text.encode()), str)]
        paths.append(path)
    return paths, {"numbers": numbers, "bad": bad}


def expected_primes(numbers: list[int]) -> list[str]:
    return [str(n) for n in sorted({n for n in numbers if sympy.isprime(n)})]


# -- pure parts ----------------------------------------------------------------------------------

def test_parse_line_is_strict_and_skips_blanks() -> None:
    assert parse_line(b" 17 \r\n") == 17
    assert parse_line(b"-5\n") == -5 and parse_line(b"+5") == 5
    assert parse_line(b"\n") is None and parse_line(b" \t ") is None
    for text in (b"1_000", b"1.5", b"0x1f", b"abc", b"1 2", b"--3", b"\xff\xfe"):
        assert isinstance(parse_line(text), str), text
    assert "digits" in parse_line(b"9" * 5000)


def test_read_numbers_reports_bad_lines_with_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "in.txt"
    path.write_bytes(b"1\n\n2\nabc\n3\r\n" + b"7" * (MAX_LINE_BYTES + 10) + b"\n4\n1_0\n5")
    items = list(read_numbers([path], block_bytes=7))  # tiny blocks: lines span reads
    numbers = [n for item in items if isinstance(item, list) for n in item]
    bad = [(b.line, b.reason) for b in items if isinstance(b, BadLine)]
    assert numbers == [1, 2, 3, 4, 5]
    assert [line for line, _ in bad] == [4, 6, 8]
    assert "longer" in bad[1][1]
    assert str(next(b for b in items if isinstance(b, BadLine))).startswith(f"{path}:4: ")


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(st.integers(-2**70, 2**70), st.sampled_from(["", "x", " 5 "])),
                max_size=80),
       st.integers(1, 9))
def test_read_numbers_agrees_with_a_line_by_line_reading(tmp_path_factory, lines: list,
                                                          block: int) -> None:
    path = tmp_path_factory.mktemp("read") / "f.txt"
    path.write_text("\n".join(map(str, lines)))
    items = list(read_numbers([path], block_bytes=block))
    got = [n for item in items if isinstance(item, list) for n in item]
    want = [v for v in map(lambda t: parse_line(str(t).encode()), lines) if isinstance(v, int)]
    assert got == want
    assert [b.line for b in items if isinstance(b, BadLine)] == \
        [i for i, t in enumerate(lines, 1) if str(t) == "x"]


def _reference_shards(numbers: list[int], plan: ShardPlan) -> list[list[int]]:
    out, current, cost = [], [], 0
    for n in numbers:
        c = number_cost(wire_number(n))
        if current and (len(current) >= plan.shard_size or cost + c > plan.max_bytes):
            out.append(current)
            current, cost = [], 0
        current.append(n)
        cost += c
    return out + ([current] if current else [])


@settings(max_examples=150, deadline=None)
@given(st.lists(st.lists(st.one_of(st.integers(-2**64, 2**64), st.integers(-2**300, 2**300)),
                         max_size=30), max_size=6),
       st.integers(1, 25), st.sampled_from([64, 90, 200, 600, 5000, 10**6]))
def test_shards_are_cut_by_count_and_bytes_the_same_way_every_time(chunks, size, max_bytes) -> None:
    plan = ShardPlan(shard_size=size, max_bytes=max_bytes)
    shards = list(iter_shards(chunks, plan, lambda bad: None))
    flat = [n for chunk in chunks for n in chunk]
    assert [s.numbers for s in shards] == _reference_shards(flat, plan)
    assert [s.index for s in shards] == list(range(len(shards)))
    for shard in shards:
        assert shard.wire == [wire_number(n) for n in shard.numbers]
        assert shard.numbers == flat[shard.first:shard.first + len(shard.numbers)]
        exact = sum(map(number_cost, shard.wire))
        assert exact <= shard.cost and (exact <= max_bytes or len(shard.numbers) == 1)


def test_wire_numbers_are_ints_in_msgpack_range_else_strings() -> None:
    assert wire_number(2**64 - 1) == 2**64 - 1 and wire_number(-(2**63)) == -(2**63)
    assert wire_number(2**64) == str(2**64) and wire_number(-(2**63) - 1) == str(-(2**63) - 1)
    big = [2**64 - 1, 2**63, -(2**63), 7]
    assert msgpack.unpackb(msgpack.packb(wire_numbers(big))) == big  # they travel as they are


def test_plan_fits_the_smallest_payload_and_is_capped_for_cpython() -> None:
    cpython = {"status": "ready", "capacity": 2, "prefetch": 2, "max_payload": 0}
    esp32 = {"status": "ready", "capacity": 1, "prefetch": 1, "max_payload": 12288}
    dead_esp = {"status": "dead", "capacity": 1, "prefetch": 1, "max_payload": 1000}
    assert plan_shards([cpython]).shard_size == DEFAULT_SHARD_SIZE
    small = plan_shards([cpython, esp32, dead_esp])
    assert small.max_bytes <= 12288 - 200 and small.shard_size * 21 <= small.max_bytes
    assert plan_shards([cpython], shard_size=10).shard_size == 10
    big_node = {"status": "ready", "capacity": 64, "prefetch": 64, "max_payload": 0}
    assert plan_shards([big_node]).max_bytes * 128 <= 1024 * 1024  # a full batch fits a packet
    after_tiny_tasks = dict(cpython, prefetch=1000)  # the prefetch a run of no-ops leaves
    assert plan_shards([after_tiny_tasks]) == plan_shards([cpython])
    assert window_for([cpython, esp32]) > window_for([esp32]) >= 4


def test_job_id_follows_the_files_and_task_ids_are_deterministic(tmp_path: Path) -> None:
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("1\n")
    b.write_text("2\n")
    first = job_id_for([a, b])
    assert job_id_for([a, b]) == first and job_id_for([b, a]) != first
    os.utime(a, ns=(1, 1))
    assert job_id_for([a, b]) != first
    digest = task_digest("primes", [[7, 8, 9]])
    assert task_id("j", 3, digest) == f"j-3-{digest}"
    assert task_id("j", 3, digest, 1) == f"j-3-{digest}-r1"


def test_task_ids_are_bound_to_what_the_shard_computes() -> None:
    """The same index with other numbers (another shard size) is another task; the same
    numbers are the same task; the name and keyword arguments count too."""
    numbers = list(range(1, 101))
    by_size = {size: [s.wire for s in iter_shards([numbers], ShardPlan(size, 10**6),
                                                  lambda bad: None)] for size in (10, 25, 37)}
    firsts = {task_id("job", 0, task_digest("primes", [shards[0]])) for shards in by_size.values()}
    assert len(firsts) == 3
    again = [s.wire for s in iter_shards([numbers], ShardPlan(25, 10**6), lambda bad: None)]
    assert [task_digest("primes", [w]) for w in again] == \
        [task_digest("primes", [w]) for w in by_size[25]]
    digest = task_digest("primes", [[2, 3]])
    assert len({digest, task_digest("primes", [["2", 3]]), task_digest("other", [[2, 3]]),
                task_digest("primes", [[2, 3]], {"x": 1}), task_digest("primes", [[3, 2]])}) == 5
    assert task_digest("p", [], {"a": 1, "b": 2}) == task_digest("p", [], {"b": 2, "a": 1})
    longest = task_id("j" * 64, 10**9, digest, 10**6)
    validate_task = make_task("primes", [[2, 3]], task_id=longest)  # the master's own bound
    assert validate_task.id == longest and len(longest) <= 128


def test_checkpoint_keeps_primes_once_in_numeric_order_and_resumes(tmp_path: Path) -> None:
    path = tmp_path / "cp"
    cp = Checkpoint(path)
    plan = ShardPlan(shard_size=10, max_bytes=1000)
    cp.begin("job-1", plan, files=["x"])
    assert cp.record_done(0, 0, "d0", 10, [2**89 - 1, 7, 11], "n1") == 3
    assert cp.record_done(1, 0, "d1", 10, [7, 101, 2**127 - 1], "n2") == 2
    cp.record_attempt(2, 1, failed=False, error="node_lost: x")
    cp.close()
    cp = Checkpoint(path)
    assert cp.reset_reason == ""
    assert cp.job_id() == "job-1" and cp.plan() == plan
    assert cp.done_shards() == {0: "d0", 1: "d1"} and cp.attempts() == {2: 1}
    assert list(cp.iter_primes()) == ["7", "11", "101", str(2**89 - 1), str(2**127 - 1)]
    assert cp.numbers_tested() == 20
    cp.begin("job-2", plan, files=["y"])
    assert cp.done_shards() == {} and cp.primes_count() == 0
    cp.remove()
    assert not path.exists()


def test_a_checkpoint_of_the_first_schema_is_emptied_not_trusted(tmp_path: Path) -> None:
    """Its shards carry no digest, so they cannot be matched to tasks by content."""
    path = tmp_path / "old.checkpoint"
    db = sqlite3.connect(str(path))
    db.executescript("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
                     "CREATE TABLE shards (shard INTEGER PRIMARY KEY, attempt INTEGER NOT NULL "
                     "DEFAULT 0, state TEXT NOT NULL, numbers INTEGER NOT NULL DEFAULT 0, "
                     "primes INTEGER NOT NULL DEFAULT 0, node TEXT NOT NULL DEFAULT '', "
                     "error TEXT NOT NULL DEFAULT '');"
                     "CREATE TABLE primes (digits INTEGER NOT NULL, value TEXT NOT NULL, "
                     "PRIMARY KEY (digits, value)) WITHOUT ROWID;"
                     "INSERT INTO meta VALUES ('schema', '1'), ('job_id', 'job-1');"
                     "INSERT INTO shards (shard, state) VALUES (0, 'done');"
                     "INSERT INTO primes VALUES (1, '4');")
    db.commit()
    db.close()
    cp = Checkpoint(path)
    assert "schema 1" in cp.reset_reason
    assert cp.job_id() is None and cp.done_shards() == {} and cp.primes_count() == 0
    cp.close()
    assert Checkpoint(path).reset_reason == ""  # emptied once, current from then on


def test_progress_json_has_type_and_version_and_leaves_unknowns_out() -> None:
    running = JobProgress(job_id="j", state="running", numbers_read=10, numbers_tested=4,
                          bad_lines=0, shards_done=1, shards_total=None, shards_in_flight=2,
                          primes=1, bytes_read=50, bytes_total=100, elapsed=1.0)
    d = running.to_dict()
    assert d["type"] == "job_progress" and d["v"] == 1
    assert "shards_total" not in d and "reason" not in d
    assert "shards 1/?" in render_progress(running)
    ended = JobProgress(job_id="j", state="interrupted", numbers_read=10, numbers_tested=4,
                        bad_lines=0, shards_done=1, shards_total=3, shards_in_flight=0,
                        primes=1, bytes_read=100, bytes_total=100, elapsed=1.0,
                        reason="stopped by a signal")
    d = ended.to_dict()
    assert d["shards_total"] == 3 and d["state"] == "interrupted" and d["reason"]
    empty = JobProgress(job_id="j", state="done", numbers_read=0, numbers_tested=0, bad_lines=0,
                        shards_done=0, shards_total=0, shards_in_flight=0, primes=0,
                        bytes_read=0, bytes_total=0, elapsed=0.1)
    assert empty.to_dict()["shards_total"] == 0 and empty.fraction == 1.0  # known: none


def test_output_is_replaced_atomically(tmp_path: Path) -> None:
    out = tmp_path / "primes.txt"
    out.write_text("old\n")
    assert write_primes(iter(["2", "3", "5"]), out) == 3
    assert out.read_text() == "2\n3\n5\n"

    def broken():
        yield "7"
        raise OSError("disk gone")
    with pytest.raises(OSError):
        write_primes(broken(), out)
    assert out.read_text() == "2\n3\n5\n"  # the old list survives a failed write
    assert sorted(p.name for p in tmp_path.iterdir()) == ["primes.txt"]


# -- the job through the fabric ---------------------------------------------------------------------

class _JobProcess:
    """A `master-node primes` run, stopped by its own handle when the test ends."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc.out.close()  # type: ignore[attr-defined]
        self.proc.err.close()  # type: ignore[attr-defined]


def primes_command(fabric: Fabric, files: list[Path], output: Path, *extra: str,
                   json_summary: bool = True) -> subprocess.Popen:
    args = [sys.executable, "-m", "master.cli", "primes", *map(str, files), "--broker",
            fabric.broker_url, "--root", fabric.root, "--output", str(output),
            *(["--json"] if json_summary else []), *extra]
    out = open(fabric.tmp / f"primes-{len(fabric.procs)}-{os.getpid()}.out", "w+")
    err = open(fabric.tmp / f"primes-{len(fabric.procs)}-{os.getpid()}.err", "w+")
    proc = subprocess.Popen(args, stdout=out, stderr=err, cwd=str(fabric.tmp), env=child_env(),
                            start_new_session=True)
    proc.out, proc.err = out, err  # type: ignore[attr-defined]
    fabric.procs.append(_JobProcess(proc))  # type: ignore[arg-type]
    return proc


def finish(proc: subprocess.Popen, timeout: float = 90, *,
           json_summary: bool = True) -> tuple[int, dict, str]:
    try:
        rc = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
        raise AssertionError("the primes command did not finish in time:\n"
                             + Path(proc.err.name).read_text()[-3000:])  # type: ignore[attr-defined]
    stdout = Path(proc.out.name).read_text()  # type: ignore[attr-defined]
    stderr = Path(proc.err.name).read_text()  # type: ignore[attr-defined]
    if not json_summary:
        return rc, {"text": stdout}, stderr
    try:
        summary = json.loads(stdout) if stdout.strip() else {}
    except ValueError:
        raise AssertionError(f"not JSON on stdout: {stdout[:500]}\n{stderr[-2000:]}") from None
    return rc, summary, stderr


def ready_nodes(fabric: Fabric, count: int) -> None:
    with fabric.client() as client:
        wait_until(lambda: sum(n["status"] == "ready" for n in client.nodes()) >= count, 30,
                   message=f"{count} ready nodes")


def completed_tasks(fabric: Fabric) -> int:
    with fabric.client() as client:
        return client.status()["completed"]


def test_job_finds_exactly_sympys_primes_and_names_bad_lines(fabric: Fabric, observer) -> None:
    files, truth = make_inputs(fabric.tmp / "input")
    fabric.master()
    fabric.node("n1", "--capacity", "2")
    fabric.node("n2")
    ready_nodes(fabric, 2)
    output = fabric.tmp / "primes.txt"
    rc, summary, stderr = finish(primes_command(fabric, files, output, "--shard-size", "200"))
    assert rc == 0, stderr
    assert output.read_text().split() == expected_primes(truth["numbers"])
    for path, line in truth["bad"]:
        assert f"{path}:{line}:" in stderr
    assert summary["complete"] is True and summary["bad_lines"] == len(truth["bad"])
    assert summary["numbers_read"] == summary["numbers_tested"] == len(truth["numbers"])
    assert summary["primes"] == len(expected_primes(truth["numbers"]))
    assert set(summary["nodes"]) == {"n1", "n2"}
    assert not Path(str(output) + ".checkpoint").exists()  # removed after a complete run
    topic = f"{fabric.root}/jobs/{summary['job_id']}/progress"
    progress = wait_until(lambda: observer.retained.get(topic), 10, message="job progress")
    progress = json.loads(progress)
    assert progress["state"] == "done" and progress["numbers_tested"] == len(truth["numbers"])
    assert all("." not in key for key in progress)


def test_node_killed_mid_job_loses_no_work(fabric: Fabric) -> None:
    files, truth = make_inputs(fabric.tmp / "input", seed=11)
    fabric.master()
    victim = fabric.node("victim", *SLOW_PRIMES)
    fabric.node("survivor", *SLOW_PRIMES)
    ready_nodes(fabric, 2)
    output = fabric.tmp / "primes.txt"
    job = primes_command(fabric, files, output, "--shard-size", "25", "--timeout", "30")

    def victim_busy(client) -> bool:
        nodes = {n["node_id"]: n for n in client.nodes()}
        return nodes["victim"]["tasks_done"] >= 5 and nodes["victim"]["in_flight"] > 0
    with fabric.client() as client:  # one connection: a check must be quicker than the job
        wait_until(lambda: victim_busy(client) or job.poll() is not None, 60,
                   message="victim at work")
    assert job.poll() is None, "the job ended before the node could be killed"
    victim.kill()
    rc, summary, stderr = finish(job)
    assert rc == 0, stderr
    assert output.read_text().split() == expected_primes(truth["numbers"])
    assert summary["numbers_tested"] == len(truth["numbers"])


def test_master_killed_mid_job_and_restarted_loses_no_work(fabric: Fabric) -> None:
    files, truth = make_inputs(fabric.tmp / "input", seed=13)
    master = fabric.master()
    fabric.node("n1", *SLOW_PRIMES)
    fabric.node("n2", *SLOW_PRIMES)
    ready_nodes(fabric, 2)
    output = fabric.tmp / "primes.txt"
    job = primes_command(fabric, files, output, "--shard-size", "15", "--timeout", "40")
    with fabric.client() as watcher:  # one connection, polled often: the job takes seconds
        wait_until(lambda: watcher.status()["completed"] >= 10 or job.poll() is not None, 60,
                   message="the job under way")
    assert job.poll() is None, "the job ended before the master could be killed"
    master.kill()
    fabric.master()
    rc, summary, stderr = finish(job)
    assert rc == 0, stderr
    assert output.read_text().split() == expected_primes(truth["numbers"])
    assert summary["numbers_tested"] == len(truth["numbers"])


def test_interrupted_command_resumes_where_it_stopped(fabric: Fabric) -> None:
    """Killed outright, then run again on another node: the checkpoint's shards are kept,
    and the summary names only the node that ran shards in the second run."""
    files, truth = make_inputs(fabric.tmp / "input", seed=17)
    fabric.master()
    first_node = fabric.node("n1", *SLOW_PRIMES)
    ready_nodes(fabric, 1)
    output = fabric.tmp / "primes.txt"
    checkpoint = Path(str(output) + ".checkpoint")

    def shards_done() -> int:
        if not checkpoint.exists():
            return 0
        db = sqlite3.connect(str(checkpoint))
        try:
            return db.execute("SELECT COUNT(*) FROM shards WHERE state = 'done'").fetchone()[0]
        except sqlite3.OperationalError:
            return 0
        finally:
            db.close()

    first = primes_command(fabric, files, output, "--shard-size", "25")
    wait_until(lambda: shards_done() >= 8 or first.poll() is not None, 60,
               message="some shards checkpointed")
    assert first.poll() is None, "the job ended before it could be interrupted"
    first.kill()
    first.wait(10)
    done_before = shards_done()
    assert first_node.terminate() == 0  # hands back what it held; the master requeues it
    fabric.node("n2", *SLOW_PRIMES)
    with fabric.client() as client:
        wait_until(lambda: {n["node_id"]: n["status"] for n in client.nodes()}.get("n2")
                   == "ready", 30, message="n2 ready")
    rc, summary, stderr = finish(primes_command(fabric, files, output, "--shard-size", "25"))
    assert rc == 0, stderr
    assert "resuming job" in stderr
    assert summary["resumed"] is True and summary["shards_from_checkpoint"] >= done_before >= 8
    assert output.read_text().split() == expected_primes(truth["numbers"])
    assert summary["numbers_tested"] == len(truth["numbers"])
    assert summary["shards_from_checkpoint"] + summary["shards_from_master"] \
        + summary["shards_run"] == summary["shards"]
    assert set(summary["nodes"]) <= {"n2"}  # n1 ran nothing in this run
    assert sum(summary["nodes"].values()) == summary["shards_run"]


def test_reruns_with_other_shard_sizes_are_exact_and_reuse_only_the_same_numbers(
        fabric: Fabric) -> None:
    """The same files through the same master, cut three ways: each run gives sympy's set,
    none takes another cut's outcomes; a fourth run with a cut seen before (and a new
    output) takes every shard from the master's earlier results and runs nothing."""
    files, truth = make_inputs(fabric.tmp / "input", seed=23)
    want = expected_primes(truth["numbers"])
    fabric.master()
    fabric.node("n1", "--capacity", "2")
    fabric.node("n2")
    ready_nodes(fabric, 2)
    output = fabric.tmp / "primes.txt"
    ran = 0
    job_ids = set()
    for extra in (["--shard-size", "100"], ["--shard-size", "37"], []):
        output.write_text("stale\n")
        rc, summary, stderr = finish(primes_command(fabric, files, output, *extra))
        assert rc == 0, stderr
        assert output.read_text().split() == want, f"run with {extra or 'the default'}"
        assert summary["numbers_tested"] == len(truth["numbers"])
        assert summary["shards_run"] == summary["shards"], extra  # no other cut's outcome
        assert summary["shards_from_master"] == summary["shards_from_checkpoint"] == 0
        assert sum(summary["nodes"].values()) == summary["shards"]
        ran += summary["shards"]
        job_ids.add(summary["job_id"])
    assert len(job_ids) == 1  # one job, the same files each time
    assert completed_tasks(fabric) == ran  # the master ran each shard of each cut once
    again = fabric.tmp / "again" / "primes.txt"
    rc, summary, stderr = finish(primes_command(fabric, files, again, "--shard-size", "37"))
    assert rc == 0, stderr
    assert again.read_text().split() == want
    assert summary["shards_from_master"] == summary["shards"] > 0
    assert summary["shards_run"] == 0 and summary["nodes"] == {}
    assert completed_tasks(fabric) == ran
    shards = summary["shards"]
    rc, summary, stderr = finish(primes_command(fabric, files, again, "--shard-size", "37",
                                                json_summary=False), json_summary=False)
    assert rc == 0, stderr
    text = summary["text"]
    assert f"0 run now, 0 from the checkpoint, {shards} from the master" in text, text
    assert "nodes this run   0: none" in text


def _progress(observer, topic: str) -> dict:
    payload = observer.retained.get(topic)
    return json.loads(payload) if payload else {}


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["sigint", "sigterm"])
def test_an_interrupted_job_says_so_on_its_progress_topic(fabric: Fabric, observer,
                                                          sig: int) -> None:
    files, truth = make_inputs(fabric.tmp / "input", seed=29)
    fabric.master()
    fabric.node("n1", *SLOW_PRIMES, "--capacity", "1")
    ready_nodes(fabric, 1)
    output = fabric.tmp / "primes.txt"
    job = primes_command(fabric, files, output, "--shard-size", "25")
    topic = f"{fabric.root}/jobs/{job_id_for(files)}/progress"
    wait_until(lambda: _progress(observer, topic).get("shards_done", 0) >= 3
               or job.poll() is not None, 60, message="the job under way")
    assert job.poll() is None, "the job ended before it could be interrupted"
    running = _progress(observer, topic)
    assert running["state"] == "running" and running["type"] == "job_progress"
    assert running["v"] == 1
    os.kill(job.pid, sig)
    rc, _summary, stderr = finish(job, json_summary=False)
    assert rc == 128 + sig, stderr
    assert "interrupted by" in stderr and "run the same command again" in stderr
    ended = wait_until(lambda: _progress(observer, topic).get("state") != "running"
                       and _progress(observer, topic), 10, message="a final progress")
    assert ended["state"] == "interrupted" and ended["reason"], ended
    assert ended["type"] == "job_progress" and ended["v"] == 1
    assert ended["shards_done"] >= running["shards_done"]
    # run again: it resumes, ends done, and the topic says so
    rc, summary, stderr = finish(primes_command(fabric, files, output, "--shard-size", "25"))
    assert rc == 0, stderr
    assert summary["shards_from_checkpoint"] >= running["shards_done"]
    assert output.read_text().split() == expected_primes(truth["numbers"])
    done = wait_until(lambda: _progress(observer, topic).get("state") == "done"
                      and _progress(observer, topic), 10, message="progress done")
    assert done["shards_total"] == summary["shards"] == done["shards_done"]
    assert done["shards_reused"] == summary["shards_from_checkpoint"] \
        + summary["shards_from_master"]


def test_a_job_that_cannot_go_on_says_failed_with_the_reason(fabric: Fabric, observer) -> None:
    files, _truth = make_inputs(fabric.tmp / "input", seed=31)
    master = fabric.master()
    fabric.node("n1", *SLOW_PRIMES, "--capacity", "1")
    ready_nodes(fabric, 1)
    output = fabric.tmp / "primes.txt"
    job = primes_command(fabric, files, output, "--shard-size", "25", "--timeout", "2",
                         "--stall-timeout", "3")
    topic = f"{fabric.root}/jobs/{job_id_for(files)}/progress"
    wait_until(lambda: _progress(observer, topic).get("shards_done", 0) >= 2
               or job.poll() is not None, 60, message="the job under way")
    assert job.poll() is None, "the job ended before its master could be killed"
    master.kill()
    rc, _summary, stderr = finish(job, 60, json_summary=False)
    assert rc == 2, stderr
    ended = wait_until(lambda: _progress(observer, topic).get("state") != "running"
                       and _progress(observer, topic), 10, message="a final progress")
    assert ended["state"] == "failed", ended
    assert "run the same command again" in ended["reason"] and "master" in ended["reason"]
    assert ended["reason"] in stderr  # the same words on the topic and on the terminal


def test_the_summary_tells_reused_shards_from_shards_run_now() -> None:
    summary = JobSummary(job_id="j", output="primes.txt", files=["a"], complete=True,
                         resumed=True, numbers_read=10, numbers_tested=10, primes=4, shards=6,
                         shards_run=3, shards_from_checkpoint=2, shards_from_master=1,
                         nodes={"n2": 2, "n3": 1}, plan={"shard_size": 2, "max_bytes": 100})
    text = format_summary(summary)
    assert "6 of up to 2 numbers: 3 run now, 2 from the checkpoint, 1 from the master's " \
        "earlier results" in text
    assert "nodes this run   2: n2 (2 shards), n3 (1 shard)" in text


def test_an_esp32_board_gets_shards_that_fit_its_payload(fabric: Fabric, boards) -> None:
    files, truth = make_inputs(fabric.tmp / "input", seed=19, count=100)
    fabric.master()
    url = parse_broker_url(fabric.broker_url)
    boards(SimpleNamespace(host=url.host, port=url.port), "esp-1", fabric.root,
           MAX_PAYLOAD=2048)
    ready_nodes(fabric, 1)
    output = fabric.tmp / "primes.txt"
    rc, summary, stderr = finish(primes_command(fabric, files, output, "--timeout", "30"),
                                 timeout=150)
    assert rc == 0, stderr
    assert summary["plan"]["max_bytes"] <= 2048 - 200
    assert summary["shards"] >= 3 and summary["nodes"] == {"esp-1": summary["shards"]}
    assert output.read_text().split() == expected_primes(truth["numbers"])


def test_without_a_master_the_command_fails_clearly(fabric: Fabric) -> None:
    files, _ = make_inputs(fabric.tmp / "input", count=10)
    rc, _summary, stderr = finish(primes_command(fabric, files, fabric.tmp / "p.txt",
                                                 "--timeout", "2"), timeout=30)
    assert rc == 2
    assert "master-node primes: error:" in stderr and "master" in stderr


def test_missing_input_file_is_a_usage_error(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "master.cli", "primes", str(tmp_path / "nope"),
                             "--broker", "mqtt://127.0.0.1:9", "--timeout", "1"],
                            capture_output=True, text=True, env=child_env(), timeout=60)
    assert result.returncode == 2
    assert "nope" in result.stderr and "cannot read the input" in result.stderr


def test_benchmark_script_short_run(tmp_path: Path) -> None:
    """scripts/bench_prime_job.py end to end on a few numbers (the long run is by hand)."""
    result = subprocess.run([sys.executable, str(Path(__file__).resolve().parents[1] / "scripts"
                                                 / "bench_prime_job.py"),
                             "--count", "3000", "--nodes", "1", "--json"],
                            capture_output=True, text=True, env=child_env(), cwd=tmp_path,
                            timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    job = report["jobs"][0]
    assert job["correct"] and job["nodes"] == 1 and job["per_second"] > 0
    assert set(job["cpu_seconds"]) == {"master", "broker", "node-1", "client"}
    assert report["routine"]["agree"]


class _MasterDouble:
    """The two calls the feeder makes, answered from a table (pure logic of the feeder)."""

    def __init__(self, known: dict[str, dict]) -> None:
        self.known = known
        self.submitted: list[str] = []

    def query(self, what: str, params: dict, *, timeout: float) -> list[dict]:
        assert what == "outcomes"
        return [self.known.get(i, {"id": i, "state": "unknown"}) for i in params["ids"]]

    def submit_many(self, calls: list[tuple], *, ack_timeout: float) -> list:
        from master.handles import TaskHandle
        self.submitted += [c[4] for c in calls]
        return [TaskHandle(c[4]) for c in calls]


def _feed(client: _MasterDouble, shards: list, done_before: dict[int, str]):
    from master.primes_job.feeder import Feeder, Window
    feeder = Feeder(client, iter(shards), job_id="j", task_name="primes", priority=5,
                    window=Window(16), done_before=done_before, attempts={}, ack_timeout=1.0)
    feeder.start()
    wait_until(lambda: feeder.reader_done or feeder.error is not None, 10, message="fed")
    feeder.stop()
    out = []
    while not feeder.submitted.empty():
        out.append(feeder.submitted.get())
    return feeder, out


def test_the_feeder_takes_finished_shards_from_the_master_and_passes_over_failed_ids() -> None:
    shards = list(iter_shards([list(range(30))], ShardPlan(10, 10**6), lambda bad: None))
    ids = [task_id("j", s.index, task_digest("primes", [s.wire])) for s in shards]
    client = _MasterDouble({
        ids[0]: {"id": ids[0], "state": "completed", "value": [2, 3], "node_id": "old"},
        ids[1]: {"id": ids[1], "state": "failed", "error": {"kind": "error"}}})
    feeder, out = _feed(client, shards, {})
    assert feeder.error is None
    by_shard = {s.shard.index: s for s in out}
    assert by_shard[0].reused and by_shard[0].handle.outcome(0).value == [2, 3]
    assert not by_shard[1].reused and by_shard[1].attempt == 1 and not by_shard[2].reused
    assert sorted(client.submitted) == sorted([ids[2], ids[1] + "-r1"])  # ids[0] not sent
    assert feeder.known_failures == 1


def test_the_feeder_refuses_a_checkpoint_whose_shard_holds_other_numbers() -> None:
    shards = list(iter_shards([list(range(30))], ShardPlan(10, 10**6), lambda bad: None))
    good = task_digest("primes", [shards[0].wire])
    feeder, out = _feed(_MasterDouble({}), shards, {0: good})
    assert feeder.error is None and feeder.shards_skipped == 1 and len(out) == 2
    feeder, _out = _feed(_MasterDouble({}), shards, {0: good, 1: "another-digest"})
    from master.primes_job.feeder import StaleCheckpoint
    assert isinstance(feeder.error, StaleCheckpoint) and "shard 1" in str(feeder.error)
