"""State machines: only the transitions of the table happen, and re-runs are possible."""

from __future__ import annotations

import pytest

from pipelines import (COMPLETED, FAILED, JOB_STATES, PAUSED, PENDING, PIPELINE_STATES, RUNNING,
                       SCHEDULED, IllegalTransition, PipelineError, StateMachine,
                       job_state_machine, pipeline_state_machine)


def walk(machine: StateMachine, *states: str) -> None:
    for state in states:
        machine.set_state(state)


def test_seed_example_with_an_explicit_table() -> None:
    machine = StateMachine(["Pending", "Running", "Completed"],
                           {"Pending": ["Running"], "Running": ["Completed"]}, "Pending")
    machine.set_state("Running")
    assert machine.get_state() == "Running"
    assert machine.can_transition("Completed")
    assert not machine.can_transition("Pending")


def test_illegal_transition_names_from_and_to_and_keeps_the_state() -> None:
    machine = pipeline_state_machine()
    with pytest.raises(IllegalTransition) as caught:
        machine.set_state(COMPLETED)
    assert caught.value.from_state == SCHEDULED
    assert caught.value.to_state == COMPLETED
    assert "Scheduled -> Completed" in str(caught.value)
    assert machine.get_state() == SCHEDULED


def test_unknown_state_is_refused() -> None:
    machine = job_state_machine()
    with pytest.raises(IllegalTransition, match="unknown state 'Done'"):
        machine.set_state("Done")
    assert machine.get_state() == PENDING


def test_a_finished_pipeline_can_run_again() -> None:
    machine = pipeline_state_machine()
    walk(machine, RUNNING, COMPLETED, RUNNING, FAILED, SCHEDULED, RUNNING, COMPLETED)
    assert machine.get_state() == COMPLETED


def test_pause_from_scheduled_and_running_and_resume_both_ways() -> None:
    machine = pipeline_state_machine()
    walk(machine, PAUSED, SCHEDULED)           # paused while idle, resumed: waits for its fire
    walk(machine, RUNNING, PAUSED, RUNNING)    # paused mid-run, resumed: the run continues
    assert machine.get_state() == RUNNING
    assert not pipeline_state_machine(PAUSED).can_transition(COMPLETED)


def test_job_retry_goes_back_to_pending_and_failed_is_final_for_the_run() -> None:
    machine = job_state_machine()
    walk(machine, RUNNING, PENDING, RUNNING, FAILED)   # one retry, then failed for good
    assert not machine.can_transition(RUNNING)         # a failed job does not run again ...
    walk(machine, PENDING, RUNNING, COMPLETED)         # ... until its next run
    assert not machine.can_transition(FAILED)


def test_a_job_whose_dependency_failed_fails_without_running() -> None:
    machine = job_state_machine()
    machine.set_state(FAILED)
    assert machine.get_state() == FAILED


@pytest.mark.parametrize("factory, states", [
    (pipeline_state_machine, PIPELINE_STATES), (job_state_machine, JOB_STATES)])
def test_every_state_of_the_predefined_tables_can_be_left(factory, states) -> None:
    for state in states:
        assert factory(state).allowed(), state


def test_a_table_naming_unknown_states_is_refused() -> None:
    with pytest.raises(PipelineError, match="unknown states"):
        StateMachine(["A", "B"], {"A": ["C"]}, "A")
    with pytest.raises(PipelineError, match="initial state 'Z'"):
        StateMachine(["A", "B"], {"A": ["B"]}, "Z")
