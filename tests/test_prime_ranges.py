"""Range shards of the prime job: the nodes parse the files' lines, the answers stay exact.

Pure parts (cutting files at line ends, the node's `primes_range`, the choice of shard form,
the fallback without gmpy2) are tested directly; a cancelled shard and a resumed range job
run as a user runs them, `master-node primes` against a real master and real nodes.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.number_text import MAX_LINE_BYTES
from core.primality import is_prime
from master.primes_job import BadLine, ShardPlan, read_numbers, task_digest, task_id
from master.primes_job.checkpoint import Checkpoint
from master.primes_job.plan import NUMBERS, RANGES, plan_shards, shard_form
from master.primes_job.ranges import iter_range_shards, range_result
from node.builtin_tasks import primes_range
from support.fabric import REPO, Fabric, child_env, wait_until
from support.workloads import SLOW_PRIMES
from test_primes_job import expected_primes, finish, make_inputs, primes_command

# -- pure parts ----------------------------------------------------------------------------------


def _run_ranges(files: list[Path], plan: ShardPlan, block: int = 1 << 20):
    """Every range shard through the node's task, as the job would: (shards, numbers, primes,
    bad lines named)."""
    bad: list[BadLine] = []
    shards = list(iter_range_shards(files, plan, bad.append, block_bytes=block))
    count, primes = 0, []
    for shard in shards:
        result = range_result(shard, primes_range(shard.wire))
        assert result.bad == len(result.bad_lines)
        bad += result.bad_lines
        count += result.numbers
        primes += [int(p) for p in result.primes]
    return shards, count, primes, bad


def _kind(bad: BadLine) -> str:
    """A line too long is "longer than" or "more digits than" depending on where a reader's
    block ends (for the client's reading alike): the same kind of fault."""
    return "long" if "longer" in bad.reason or "digits" in bad.reason else bad.reason


def _by_reading(files: list[Path]):
    numbers, bad = [], []
    for item in read_numbers(files):
        if isinstance(item, BadLine):
            bad.append(item)
        else:
            numbers += item
    return numbers, bad


def test_nodes_parsing_ranges_find_what_the_client_reading_finds(tmp_path: Path) -> None:
    """Blank, bad and overlong lines, CRLF, bytes above 127, a last line without a newline:
    the same numbers, the same primes, the same bad lines at the same file:line, every cut."""
    files, _truth = make_inputs(tmp_path / "in")
    odd = tmp_path / "odd.txt"
    odd.write_bytes(b"1\n\n2\nabc\n3\r\n" + b"7" * (MAX_LINE_BYTES + 10) + b"\n4\n1_0\n\xff\xfe\n"
                    + b"9" * 4300 + b"\n" + b"8" * 5000 + b"\n13")
    files.append(odd)
    numbers, bad = _by_reading(files)
    want = sorted(n for n in numbers if is_prime(n))
    for size, max_bytes in [(4096, 10**6), (25, 10**6), (1, 10**6), (100, 300), (3, 64)]:
        shards, count, primes, got_bad = _run_ranges(files, ShardPlan(size, max_bytes, RANGES),
                                                      block=37)
        assert count == len(numbers), (size, max_bytes)
        assert sorted(primes) == want
        assert sorted((b.path, b.line, _kind(b)) for b in got_bad) == \
            sorted((b.path, b.line, _kind(b)) for b in bad)
        assert [s.index for s in shards] == list(range(len(shards)))
        assert all(s.cost <= max_bytes or s.lines <= 1 for s in shards)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(st.integers(-2**70, 2**70), st.sampled_from(["", "x", " 5 ", "1_0"])),
                max_size=60),
       st.integers(1, 12), st.integers(1, 40))
def test_range_shards_agree_with_reading_for_any_lines(tmp_path_factory, lines: list,
                                                        size: int, block: int) -> None:
    path = tmp_path_factory.mktemp("ranges") / "f.txt"
    path.write_text("\n".join(map(str, lines)))
    numbers, bad = _by_reading([path])
    _shards, count, primes, got_bad = _run_ranges([path], ShardPlan(size, 10**6, RANGES), block)
    assert count == len(numbers)
    assert sorted(primes) == sorted(n for n in numbers if is_prime(n))
    assert sorted(b.line for b in got_bad) == sorted(b.line for b in bad)


def test_range_task_ids_are_bound_to_the_bytes_of_the_cut(tmp_path: Path) -> None:
    """Another --shard-size cuts other ranges, so other ids: a rerun never takes an outcome
    computed for other numbers; the same cut gives the very same ids."""
    path = tmp_path / "n.txt"
    rng = random.Random(3)
    path.write_text("".join(f"{rng.getrandbits(64)}\n" for _ in range(2000)))

    def ids(size: int) -> list[str]:
        plan = ShardPlan(size, 10**6, RANGES)
        return [task_id("job", s.index, task_digest(plan.task_name, [s.wire]))
                for s in iter_range_shards([path], plan, lambda bad: None)]
    by_size = {size: ids(size) for size in (100, 37, 4096)}
    assert len({v[0] for v in by_size.values()}) == 3
    assert not set(by_size[100]) & set(by_size[37])
    assert ids(37) == by_size[37]


def test_ranges_only_when_every_prime_testing_node_parses_them() -> None:
    cpython = {"status": "ready", "capacity": 1, "prefetch": 1,
               "tasks": ["echo", "noop", "primes", "primes_range"]}
    board = {"status": "ready", "capacity": 1, "prefetch": 1, "max_payload": 12288,
             "tasks": ["echo", "lambda", "noop", "primes", "sleep"]}
    other = {"status": "ready", "capacity": 1, "prefetch": 1, "tasks": ["resize"]}
    assert shard_form([cpython, other]) == RANGES
    assert shard_form([cpython, board]) == NUMBERS      # the board must get work it runs
    assert shard_form([board]) == NUMBERS               # a board-only fleet: numbers
    assert shard_form([cpython, dict(board, status="dead")]) == RANGES
    assert shard_form([dict(cpython, tasks=[])]) == NUMBERS  # lists nothing: not counted on
    plan = plan_shards([cpython], form=RANGES)
    assert plan.task_name == "primes_range" and ShardPlan.from_dict(plan.to_dict()) == plan
    assert ShardPlan.from_dict({"shard_size": 5, "max_bytes": 100}).form == NUMBERS


def test_a_node_answer_that_does_not_fit_its_shard_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "n.txt"
    path.write_text("7\n8\n9\n")
    shard = next(iter_range_shards([path], ShardPlan(10, 10**6, RANGES), lambda bad: None))
    assert range_result(shard, {"primes": [7], "numbers": 3, "bad": 0}).primes == [7]
    for answer in ([7], {"primes": [7], "numbers": 99, "bad": 0},
                   {"primes": ["07"], "numbers": 3}, {"primes": [1], "numbers": 3},
                   {"primes": [7], "numbers": 3, "bad_lines": [[50, "x", "y"]]}):
        with pytest.raises(ValueError):
            range_result(shard, answer)


def test_a_checkpoint_keeps_the_counts_a_skipped_range_adds(tmp_path: Path) -> None:
    cp = Checkpoint(tmp_path / "cp")
    cp.begin("j", ShardPlan(10, 1000, RANGES), files=["x"])
    cp.record_done(0, 0, "d0", 8, [7, "618970019642690137449562111"], "n1", bad=2)
    cp.close()
    cp = Checkpoint(tmp_path / "cp")
    assert cp.done_counts() == {0: (8, 2)} and cp.plan().form == RANGES
    assert list(cp.iter_primes()) == ["7", "618970019642690137449562111"]
    cp.close()


def test_without_gmpy2_the_pure_routine_gives_the_same_answers() -> None:
    """gmpy2 is a dependency only where wheels exist: elsewhere the import fails and the
    pure routine runs, on the node's range task too."""
    code = (
        "import sys; sys.modules['gmpy2'] = None\n"
        "from core import primality as p\n"
        "from node.builtin_tasks import primes_range\n"
        "nums = [2, 3, 4, 561, 2**61 - 1, 3825123056546413051, 2**89 - 1, 2**64 + 13, -7]\n"
        "assert not p.HAS_GMPY2\n"
        "assert p.filter_primes(nums) == [n for n in nums if p.is_prime_pure(n)]\n"
        "r = primes_range(''.join(f'{n}\\n' for n in nums) + 'x\\n')\n"
        "print(p.filter_primes(nums), r['primes'], r['numbers'], r['bad'])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=REPO, env=child_env(), timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("] ")[0] == \
        "[2, 3, 2305843009213693951, 618970019642690137449562111, 18446744073709551629"
    assert out.stdout.split()[-2:] == ["9", "1"]
    assert "'618970019642690137449562111'" in out.stdout  # above 2**64: as decimal text


# -- through the fabric ----------------------------------------------------------------------------


def test_a_cancelled_shard_ends_the_job_cancelled_and_a_rerun_completes(
        fabric: Fabric, observer) -> None:
    files, truth = make_inputs(fabric.tmp / "input", seed=37)
    fabric.master()
    fabric.node("n1", *SLOW_PRIMES, "--capacity", "1")
    with fabric.client() as client:
        wait_until(lambda: any(n["status"] == "ready" for n in client.nodes()), 30,
                   message="a ready node")
        output = fabric.tmp / "primes.txt"
        job = primes_command(fabric, files, output, "--shard-size", "25")
        queued = wait_until(lambda: job.poll() is None and client.tasks(
            state="queued", name="primes_range", limit=5) or job.poll() is not None, 60,
            message="queued range shards")
        assert job.poll() is None, "the job ended before a shard could be cancelled"
        client.cancel(queued[-1]["id"])
    rc, summary, stderr = finish(job)
    assert rc == 1, stderr
    assert summary["complete"] is False and summary["shards_failed"] == 1
    assert "cancelled" in summary["failed"][0]["error"] and "was cancelled" in stderr
    topic = f"{fabric.root}/jobs/{summary['job_id']}/progress"
    ended = wait_until(lambda: json.loads(observer.retained.get(topic) or "{}").get("state")
                       == "cancelled", 10, message="progress cancelled")
    assert ended
    rc, summary, stderr = finish(primes_command(fabric, files, output, "--shard-size", "25"))
    assert rc == 0, stderr
    assert summary["shards_run"] == 1 and summary["resumed"] is True
    assert output.read_text().split() == expected_primes(truth["numbers"])
    assert summary["numbers_tested"] == summary["numbers_read"] == len(truth["numbers"])
    assert summary["bad_lines"] == len(truth["bad"])  # the checkpoint's shards count theirs


def test_prime_job_benchmark_without_gmpy2_short_run(tmp_path: Path) -> None:
    """scripts/bench_prime_job.py --without-gmpy2: every process on the pure routine, and the
    target printed with its figure and the reference from the same run."""
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_prime_job.py"),
                          "--count", "2000", "--nodes", "2", "--without-gmpy2", "--json"],
                         capture_output=True, text=True, env=child_env(), cwd=tmp_path,
                         timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout)
    assert not report["environment"]["gmpy2"] and report["reference"] in (
        "is_prime (pure)", "filter_primes (batch)")
    (target,) = report["targets"]
    job = report["jobs"][0]
    assert job["correct"] and job["nodes"] == 2
    assert target["figure"] == round(job["per_second"], 1)
    assert target["ratio"] == round(job["ratio_vs_routine"], 3) and target["target"] == 1.7
