"""State machines with an explicit table of allowed transitions; the tables of pipelines and jobs.

Pipelines (the lifecycle of a configured pipeline, across its runs):

    Scheduled -> Running | Paused
    Running   -> Completed | Failed | Paused
    Paused    -> Scheduled          resumed with no run to finish: waits for its next fire
              -> Running            resumed with a paused run: that run continues
    Completed -> Scheduled | Running | Paused      re-runs: a finished pipeline runs again
    Failed    -> Scheduled | Running | Paused

Jobs (one job of a pipeline, across runs):

    Pending   -> Running
              -> Failed             a dependency failed: the job ends without running
    Running   -> Completed | Failed
              -> Pending            an attempt failed and a retry is left, or the run was
                                    interrupted and the job waits to run again
    Completed -> Pending            the next run of the job
    Failed    -> Pending            the next run of the job

A job is Failed only once its retries are spent, or when a dependency failed; a failing attempt
with retries left goes back to Pending.

`StateMachine(states)` alone, with no table and no initial state, is a free machine: it starts
with no state (`get_state()` is None) and `set_state` accepts any of the listed states from any
other, itself included; a name not in the list is still refused. The pipelines and jobs of this
package use the tables above.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from pipelines.errors import IllegalTransition, PipelineError

__all__ = [
    "StateMachine",
    "SCHEDULED",
    "PENDING",
    "RUNNING",
    "PAUSED",
    "COMPLETED",
    "FAILED",
    "PIPELINE_STATES",
    "PIPELINE_TRANSITIONS",
    "JOB_STATES",
    "JOB_TRANSITIONS",
    "pipeline_state_machine",
    "job_state_machine",
]

SCHEDULED = "Scheduled"
PENDING = "Pending"
RUNNING = "Running"
PAUSED = "Paused"
COMPLETED = "Completed"
FAILED = "Failed"

PIPELINE_STATES: tuple[str, ...] = (SCHEDULED, RUNNING, PAUSED, COMPLETED, FAILED)
PIPELINE_TRANSITIONS: Mapping[str, frozenset[str]] = {
    SCHEDULED: frozenset({RUNNING, PAUSED}),
    RUNNING: frozenset({COMPLETED, FAILED, PAUSED}),
    PAUSED: frozenset({SCHEDULED, RUNNING}),
    COMPLETED: frozenset({SCHEDULED, RUNNING, PAUSED}),
    FAILED: frozenset({SCHEDULED, RUNNING, PAUSED}),
}
JOB_STATES: tuple[str, ...] = (PENDING, RUNNING, COMPLETED, FAILED)
JOB_TRANSITIONS: Mapping[str, frozenset[str]] = {
    PENDING: frozenset({RUNNING, FAILED}),
    RUNNING: frozenset({COMPLETED, FAILED, PENDING}),
    COMPLETED: frozenset({PENDING}),
    FAILED: frozenset({PENDING}),
}


class StateMachine:
    """The current state of one thing, changed only along the transitions of its table."""

    def __init__(
        self, states: Iterable[str], transitions: Mapping[str, Iterable[str]] | None = None,
        initial: str | None = None,
    ) -> None:
        self.states: tuple[str, ...] = tuple(states)
        known = set(self.states)
        if not self.states or len(known) != len(self.states) \
                or not all(isinstance(state, str) and state for state in self.states):
            raise PipelineError(f"states must be distinct non-empty names, got {list(self.states)}")
        if transitions is None:  # free: any listed state may follow any other
            transitions = {state: self.states for state in self.states}
        self.transitions: dict[str, frozenset[str]] = {
            source: frozenset(targets) for source, targets in transitions.items()
        }
        for source, targets in self.transitions.items():
            unknown = ({source} | targets) - known
            if unknown:
                raise PipelineError(f"transition table names unknown states {sorted(unknown)}")
        if initial is not None and initial not in known:
            raise PipelineError(f"initial state {initial!r} is not one of {list(self.states)}")
        self.current_state: str | None = initial

    def get_state(self) -> str | None:
        """The current state; None before the first `set_state` of a machine with no initial."""
        return self.current_state

    def can_transition(self, state: str) -> bool:
        """Whether `set_state(state)` would be allowed now."""
        return state in self.allowed()

    def allowed(self) -> frozenset[str]:
        """The states reachable from the current one (every state, while there is none)."""
        if self.current_state is None:
            return frozenset(self.states)
        return self.transitions.get(self.current_state, frozenset())

    def set_state(self, state: str) -> None:
        """Move to `state`; `IllegalTransition` (naming from and to) if the table forbids it."""
        if state not in self.states:
            raise IllegalTransition(
                self.current_state, state,
                f"unknown state {state!r}: expected one of {list(self.states)}")
        if not self.can_transition(state):
            allowed = sorted(self.allowed())
            raise IllegalTransition(
                self.current_state, state,
                f"illegal transition {self.current_state} -> {state} "
                f"(allowed from {self.current_state}: {', '.join(allowed) or 'none'})")
        self.current_state = state

    def __repr__(self) -> str:
        return f"StateMachine(current_state={self.current_state!r})"


def pipeline_state_machine(initial: str = SCHEDULED) -> StateMachine:
    """A state machine over the pipeline table."""
    return StateMachine(PIPELINE_STATES, PIPELINE_TRANSITIONS, initial)


def job_state_machine(initial: str = PENDING) -> StateMachine:
    """A state machine over the job table."""
    return StateMachine(JOB_STATES, JOB_TRANSITIONS, initial)
