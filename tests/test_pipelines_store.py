"""The versioned store: each commit is a version, conflicts are detected, runs survive reopening."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path

import pytest

from pipelines import (COMPLETED, FAILED, PAUSED, PENDING, RUNNING, JobModel, JobRun,
                       PipelineModel, StoreError, TransactionConflict, TransactionError,
                       UnknownRun, VersionedStore, parse_pipelines)

CONFIG = parse_pipelines({"etl": {"jobs": {
    "extract": {"task": "echo", "schedule": "10m"},
    "load": {"task": "echo", "depends_on": ["extract"]},
}}})[0]


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "state.sqlite"


@pytest.fixture
def store(path: Path) -> VersionedStore:
    with VersionedStore(path, clock=Clock()) as opened:
        yield opened


def test_seed_style_transaction_saves_a_pipeline_and_its_job(store: VersionedStore) -> None:
    model = PipelineModel("etl", CONFIG, store=store)
    job = JobModel("etl", "extract", "10m", store=store)
    tx = model.begin_transaction()
    model.save_pipeline(tx)
    job.save_job(tx)
    assert store.read(model.key) is None          # nothing visible before the commit
    model.commit(tx)
    assert store.read(model.key).state == "Scheduled"
    assert store.read(job.key).data["schedule"] == "10m"
    assert (model.version, job.version) == (1, 1)


def test_every_commit_is_a_version_and_history_lists_them_all(store: VersionedStore) -> None:
    model = PipelineModel("etl", CONFIG, store=store)
    for state in (None, "Running", "Completed"):
        if state:
            model.state_machine.set_state(state)
        model.save()
    history = model.history()
    assert [(v.version, v.state) for v in history] == [
        (1, "Scheduled"), (2, "Running"), (3, "Completed")]
    assert all(v.data["name"] == "etl" for v in history)
    assert history[0].committed_at < history[1].committed_at < history[2].committed_at
    assert store.read(model.key).version == 3


def test_two_transactions_changing_one_model_conflict(store: VersionedStore) -> None:
    PipelineModel("etl", CONFIG, store=store).save()
    first = PipelineModel.load(CONFIG, store=store)
    second = PipelineModel.load(CONFIG, store=store)
    tx1, tx2 = first.begin_transaction(), second.begin_transaction()
    first.state_machine.set_state("Running")
    second.state_machine.set_state("Paused")
    first.save_pipeline(tx1)
    second.save_pipeline(tx2)
    first.commit(tx1)
    with pytest.raises(TransactionConflict) as caught:
        second.commit(tx2)
    assert caught.value.key == "pipeline:etl"
    assert caught.value.committed_version == 2
    assert [v.state for v in store.history("pipeline:etl")] == ["Scheduled", "Running"]
    assert second.version == 1                     # the loser's commit did not happen
    with pytest.raises(TransactionError):
        second.commit(tx2)                         # and its transaction is over


def test_a_transaction_begun_before_another_commit_conflicts_even_if_it_wrote_later(
        store: VersionedStore) -> None:
    model = PipelineModel("etl", CONFIG, store=store)
    model.save()
    late = store.begin()
    model.state_machine.set_state("Running")
    model.save()                                    # committed after `late` began
    assert late.read(model.key).state == "Scheduled"  # `late` still sees its snapshot
    late.write(model.key, "Paused", {"name": "etl"})
    with pytest.raises(TransactionConflict):
        store.commit(late)


def test_conflicts_are_detected_across_connections(path: Path) -> None:
    with VersionedStore(path) as a, VersionedStore(path) as b:
        tx_a, tx_b = a.begin(), b.begin()
        tx_a.write("k", "A", {"by": "a"})
        tx_b.write("k", "B", {"by": "b"})
        a.commit(tx_a)
        with pytest.raises(TransactionConflict):
            b.commit(tx_b)
        assert b.read("k").data == {"by": "a"}


def test_a_conflict_commits_none_of_the_transactions_writes(store: VersionedStore) -> None:
    tx1, tx2 = store.begin(), store.begin()
    tx1.write("shared", "x", 1)
    tx2.write("other", "y", 2)
    tx2.write("shared", "y", 2)
    store.commit(tx1)
    with pytest.raises(TransactionConflict):
        store.commit(tx2)
    assert store.read("other") is None


def test_transactions_on_different_models_both_commit(store: VersionedStore) -> None:
    extract = JobModel("etl", "extract", store=store)
    load = JobModel("etl", "load", store=store)
    tx1, tx2 = extract.begin_transaction(), load.begin_transaction()
    extract.save_job(tx1)
    load.save_job(tx2)
    extract.commit(tx1)
    load.commit(tx2)
    assert extract.version == load.version == 1


def test_rollback_leaves_the_last_committed_version(store: VersionedStore) -> None:
    model = PipelineModel("etl", CONFIG, store=store)
    model.save()
    tx = model.begin_transaction()
    model.state_machine.set_state("Running")
    model.save_pipeline(tx)
    model.rollback(tx)
    assert store.read(model.key).state == "Scheduled"
    assert len(model.history()) == 1
    assert PipelineModel.load(CONFIG, store=store).state == "Scheduled"
    with pytest.raises(TransactionError):
        model.save_pipeline(tx)


def test_load_restores_the_last_committed_state(store: VersionedStore) -> None:
    model = PipelineModel("etl", CONFIG, store=store)
    model.state_machine.set_state("Paused")
    model.last_run_id = "r1"
    model.save()
    loaded = PipelineModel.load(CONFIG, store=store)
    assert (loaded.state, loaded.version, loaded.last_run_id) == ("Paused", 1, "r1")


def test_values_that_are_not_json_are_refused(store: VersionedStore) -> None:
    tx = store.begin()
    with pytest.raises(StoreError, match="not JSON-serialisable"):
        tx.write("k", "s", {"when": object()})


def test_a_transaction_cannot_be_committed_by_another_store(path: Path,
                                                           tmp_path: Path) -> None:
    with VersionedStore(path) as a, VersionedStore(tmp_path / "other.sqlite") as b:
        with pytest.raises(TransactionError):
            b.commit(a.begin())


def test_uses_wal_and_only_tables_prefixed_pipeline(path: Path) -> None:
    VersionedStore(path).close()
    with closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        names = [row[0] for row in conn.execute(
            "SELECT name FROM sqlite_master WHERE type IN ('table', 'index') "
            "AND name NOT LIKE 'sqlite_%'")]
    assert names and all(name.startswith("pipeline_") for name in names)


def test_runs_and_job_states_survive_reopening(path: Path) -> None:
    with VersionedStore(path) as store:
        store.create_run(run_id="r1", pipeline="etl", jobs=["extract", "load"],
                         trigger="manual", started_at=10.0)
        store.save_run_job("r1", JobRun("extract", COMPLETED, 1, {"rows": 3}, None, 11.0, 12.0))
        store.save_run_job("r1", JobRun("load", RUNNING, 2, None, "boom", 13.0, None))
        store.set_run_metadata("r1", {"day": "mon"})
    with VersionedStore(path) as store:
        run = store.get_run("r1")
        assert run.state == RUNNING
        assert list(run.jobs) == ["extract", "load"]
        assert run.jobs["extract"] == JobRun("extract", COMPLETED, 1, {"rows": 3}, None, 11.0,
                                             12.0)
        assert run.jobs["load"].attempts == 2
        assert (run.has_metadata, run.metadata) == (True, {"day": "mon"})
        assert [r.run_id for r in store.unfinished_runs("etl")] == ["r1"]
        assert store.latest_job_result("etl", "extract") == (True, {"rows": 3})
        assert store.latest_job_result("etl", "load") == (False, None)
        store.set_run_state("r1", FAILED, finished_at=20.0, error="job 'load' failed")
        assert store.unfinished_runs("etl") == []
        assert store.get_run("r1").error == "job 'load' failed"


def test_runs_are_listed_newest_first_and_filtered(store: VersionedStore) -> None:
    for n, trigger in enumerate(["manual", "schedule", "schedule"]):
        store.create_run(run_id=f"r{n}", pipeline="etl", jobs=["extract"], trigger=trigger,
                         started_at=float(n))
    store.set_run_state("r1", PAUSED)
    assert [r.run_id for r in store.runs("etl")] == ["r2", "r1", "r0"]
    assert [r.run_id for r in store.runs("etl", limit=1, trigger="schedule")] == ["r2"]
    assert [r.run_id for r in store.runs("etl", states=(PAUSED,))] == ["r1"]
    assert store.runs("other") == []
    assert store.get_run("r0").jobs["extract"].state == PENDING
    with pytest.raises(UnknownRun):
        store.get_run("nope")


def test_an_unstorable_result_is_refused_and_nothing_changes(store: VersionedStore) -> None:
    store.create_run(run_id="r", pipeline="etl", jobs=["extract"], trigger="manual",
                     started_at=1.0)
    with pytest.raises(StoreError, match="result of job 'extract'"):
        store.save_run_job("r", JobRun("extract", COMPLETED, 1, {1, 2}))
    assert store.get_run("r").jobs["extract"].state == PENDING
