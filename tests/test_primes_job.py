"""The prime job: exact answers, bad input named, and nothing lost when a process dies.

The pure parts (reading, sharding, planning, the checkpoint, the output) are tested directly;
the job itself runs as a user runs it, `master-node primes` against a real master and real
compute nodes, on the embedded broker and on mosquitto.
"""

from __future__ import annotations

import json
import os
import random
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

from master.primes_job import (BadLine, Checkpoint, ShardPlan, iter_shards, job_id_for,
                               parse_line, plan_shards, read_numbers, task_id, window_for,
                               write_primes)
from master.primes_job.numbers import MAX_LINE_BYTES, wire_number, wire_numbers
from master.primes_job.plan import DEFAULT_SHARD_SIZE, number_cost
from core.url import parse_broker_url
from esp32_support import boards, micropython, umqtt_file  # noqa: F401 (fixtures)
from support.fabric import Fabric, child_env, wait_until

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
    assert window_for([cpython, esp32]) > window_for([esp32]) >= 4


def test_job_id_follows_the_files_and_task_ids_are_deterministic(tmp_path: Path) -> None:
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("1\n")
    b.write_text("2\n")
    first = job_id_for([a, b])
    assert job_id_for([a, b]) == first and job_id_for([b, a]) != first
    os.utime(a, ns=(1, 1))
    assert job_id_for([a, b]) != first
    assert task_id("j", 3) == "j-3" and task_id("j", 3, 1) == "j-3-r1"


def test_checkpoint_keeps_primes_once_in_numeric_order_and_resumes(tmp_path: Path) -> None:
    path = tmp_path / "cp"
    cp = Checkpoint(path)
    plan = ShardPlan(shard_size=10, max_bytes=1000)
    cp.begin("job-1", plan, files=["x"])
    assert cp.record_done(0, 0, 10, [2**89 - 1, 7, 11], "n1") == 3
    assert cp.record_done(1, 0, 10, [7, 101, 2**127 - 1], "n2") == 2
    cp.record_attempt(2, 1, failed=False, error="node_lost: x")
    cp.close()
    cp = Checkpoint(path)
    assert cp.job_id() == "job-1" and cp.plan() == plan
    assert cp.done_shards() == {0, 1} and cp.attempts() == {2: 1}
    assert list(cp.iter_primes()) == ["7", "11", "101", str(2**89 - 1), str(2**127 - 1)]
    assert cp.nodes_used() == {"n1": 1, "n2": 1} and cp.numbers_tested() == 20
    cp.begin("job-2", plan, files=["y"])
    assert cp.done_shards() == set() and cp.primes_count() == 0
    cp.remove()
    assert not path.exists()


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

def primes_command(fabric: Fabric, files: list[Path], output: Path, *extra: str) -> subprocess.Popen:
    args = [sys.executable, "-m", "master.cli", "primes", *map(str, files), "--broker",
            fabric.broker_url, "--root", fabric.root, "--output", str(output), "--json",
            *extra]
    out = open(fabric.tmp / f"primes-{len(fabric.procs)}-{os.getpid()}.out", "w+")
    err = open(fabric.tmp / f"primes-{len(fabric.procs)}-{os.getpid()}.err", "w+")
    proc = subprocess.Popen(args, stdout=out, stderr=err, cwd=str(fabric.tmp), env=child_env(),
                            start_new_session=True)
    proc.out, proc.err = out, err  # type: ignore[attr-defined]
    return proc


def finish(proc: subprocess.Popen, timeout: float = 90) -> tuple[int, dict, str]:
    try:
        rc = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
        raise AssertionError("the primes command did not finish in time:\n"
                             + Path(proc.err.name).read_text()[-3000:])  # type: ignore[attr-defined]
    stdout = Path(proc.out.name).read_text()  # type: ignore[attr-defined]
    stderr = Path(proc.err.name).read_text()  # type: ignore[attr-defined]
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
    victim = fabric.node("victim", "--task", "support.workloads:primes")
    fabric.node("survivor", "--task", "support.workloads:primes")
    ready_nodes(fabric, 2)
    output = fabric.tmp / "primes.txt"
    job = primes_command(fabric, files, output, "--shard-size", "25", "--timeout", "30")

    def victim_busy() -> bool:
        with fabric.client() as client:
            nodes = {n["node_id"]: n for n in client.nodes()}
        return nodes["victim"]["tasks_done"] >= 5 and nodes["victim"]["in_flight"] > 0
    wait_until(lambda: victim_busy() or job.poll() is not None, 60, message="victim at work")
    assert job.poll() is None, "the job ended before the node could be killed"
    victim.kill()
    rc, summary, stderr = finish(job)
    assert rc == 0, stderr
    assert output.read_text().split() == expected_primes(truth["numbers"])
    assert summary["numbers_tested"] == len(truth["numbers"])


def test_master_killed_mid_job_and_restarted_loses_no_work(fabric: Fabric) -> None:
    files, truth = make_inputs(fabric.tmp / "input", seed=13)
    master = fabric.master()
    fabric.node("n1", "--task", "support.workloads:primes")
    fabric.node("n2", "--task", "support.workloads:primes")
    ready_nodes(fabric, 2)
    output = fabric.tmp / "primes.txt"
    job = primes_command(fabric, files, output, "--shard-size", "25", "--timeout", "40")
    wait_until(lambda: completed_tasks(fabric) >= 10 or job.poll() is not None, 60,
               message="the job under way")
    assert job.poll() is None, "the job ended before the master could be killed"
    master.kill()
    fabric.master()
    rc, summary, stderr = finish(job)
    assert rc == 0, stderr
    assert output.read_text().split() == expected_primes(truth["numbers"])
    assert summary["numbers_tested"] == len(truth["numbers"])


def test_interrupted_command_resumes_where_it_stopped(fabric: Fabric) -> None:
    files, truth = make_inputs(fabric.tmp / "input", seed=17)
    fabric.master()
    fabric.node("n1", "--task", "support.workloads:primes")
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
    rc, summary, stderr = finish(primes_command(fabric, files, output, "--shard-size", "25"))
    assert rc == 0, stderr
    assert "resuming job" in stderr
    assert summary["resumed"] is True and summary["shards_skipped"] >= done_before >= 8
    assert output.read_text().split() == expected_primes(truth["numbers"])
    assert summary["numbers_tested"] == len(truth["numbers"])


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
