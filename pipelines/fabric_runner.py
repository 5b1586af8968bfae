"""Running a job's task on the fabric from any program, through a broker connection.

`PipelineManager` and `PipelineExecutor` built without a `run_task` use `FabricRunTask()`: a
`FabricClient` on $FABRIC_BROKER (else mqtt://127.0.0.1:1883) and the topic root `fabric`,
connected on the first job. Inside the master, `master.pipelines_bridge` submits to the master
directly instead.

One budget for retries. A call runs its task at most once on the fabric (it is submitted with
`max_attempts=1`): a failure, a lost node or a crashed worker comes back as `JobFailed`, and
the executor decides whether the job has a retry left. A job with `retries = r` therefore runs
at most r + 1 times in all, never r + 1 times the master's `--max-attempts`. Errors another
run cannot cure (an unknown task, a refused request, a task timeout on the node: the fabric's
permanent errors) are `JobFailed(permanent=True)`, and the executor does not retry them.
"""

from __future__ import annotations

import asyncio
import threading
from functools import partial
from typing import TYPE_CHECKING, Any

from core import states
from core.protocol import TaskOutcome
from core.topics import DEFAULT_ROOT

from pipelines.config import DEFAULT_TIMEOUT
from pipelines.errors import JobFailed

if TYPE_CHECKING:
    from master.client import FabricClient

__all__ = ["FabricRunTask", "task_failure", "ONE_RUN"]

ONE_RUN = 1  # the fabric attempts a pipeline job's task gets per call: retries are the job's


class FabricRunTask:
    """A `run_task` that submits each call as one fabric task and awaits its outcome."""

    def __init__(self, *, broker_url: str | None = None, root: str = DEFAULT_ROOT,
                 client: FabricClient | None = None, connect_timeout: float = 10.0,
                 ack_timeout: float = 10.0) -> None:
        self.broker_url = broker_url
        self.root = root
        self.connect_timeout = connect_timeout
        self.ack_timeout = ack_timeout
        self._client = client
        self._owns_client = client is None
        self._lock = threading.Lock()

    async def __call__(self, task_name: str, args: list[Any], kwargs: dict[str, Any], *,
                       priority: int, timeout: float | None = None) -> Any:
        """Run `task_name` once on the fabric; its value, or `JobFailed` saying why not."""
        loop = asyncio.get_running_loop()
        client = await loop.run_in_executor(None, self.client)
        handle = await loop.run_in_executor(None, partial(
            client.submit, task_name, list(args), dict(kwargs), priority=priority,
            ack_timeout=self.ack_timeout, max_attempts=ONE_RUN))
        outcome = await asyncio.wait_for(asyncio.wrap_future(handle.future),
                                         timeout or DEFAULT_TIMEOUT)
        if outcome.state != states.COMPLETED:
            raise task_failure(outcome)
        return outcome.value

    def client(self) -> FabricClient:
        """The connected client (connecting it on first use; blocking, bounded)."""
        with self._lock:
            if self._client is None:
                from master.client import FabricClient  # only programs that run jobs need it
                self._client = FabricClient(broker_url=self.broker_url, root=self.root)
                try:
                    self._client.start(timeout=self.connect_timeout)
                except BaseException:
                    self._client.close()
                    self._client = None
                    raise
            return self._client

    def close(self) -> None:
        """Disconnect the client this runner opened (one it was given stays open)."""
        with self._lock:
            client, self._client = self._client, None
        if client is not None and self._owns_client:
            client.close()


def task_failure(outcome: TaskOutcome) -> JobFailed:
    """The `JobFailed` for a failed outcome: the task's own error first, then which task and
    node; permanent when the fabric says another run cannot cure it."""
    from master.scheduler import PERMANENT_ERRORS  # loaded only once a task has failed
    error = outcome.error or {}
    kind = error.get("kind")
    what = error.get("type") or kind or outcome.state
    message = error.get("message") or ""
    node = error.get("node_id") or outcome.node_id
    where = f"task {outcome.id}" + (f" on {node}" if node else "")
    text = f"{what}: {message} ({where})" if message else f"{what} ({where})"
    return JobFailed(text, permanent=kind in PERMANENT_ERRORS)
