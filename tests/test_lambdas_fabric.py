"""Lambdas through the fabric: a client dispatches, a real node runs them under limits, and
every failure comes back as a structured error while the node keeps serving."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from core.errors import TaskFailed
from support.fabric import Fabric, Proc, wait_until

USER_MODULE = textwrap.dedent('''
    import os


    def lambda_handler(event, context):
        """User code: sums the event's numbers, shows its limits and environment."""
        return {"total": sum(event["numbers"]), "memory_limit_mb": context.memory_limit_mb,
                "greeting": os.environ.get("GREETING")}
''')


def ready(client, count: int = 1) -> None:
    wait_until(lambda: sum(n["status"] == "ready" for n in client.nodes()) >= count, 30,
               message=f"{count} ready nodes")


def failure(client, lambda_data: dict) -> dict:
    with pytest.raises(TaskFailed) as failed:
        client.dispatch_lambda(lambda_data).result(timeout=60)
    return failed.value.error


def test_lambda_failures_are_structured_and_the_node_keeps_serving(fabric: Fabric) -> None:
    fabric.master("--max-attempts", "1")
    fabric.node("lam", "--capacity", "2")
    with fabric.client() as client:
        ready(client)
        assert client.dispatch_lambda({"name": "echo", "event": {"a": [1, 2]}}).result(
            timeout=30) == {"a": [1, 2]}

        error = failure(client, {"name": "sleep", "event": {"seconds": 30}, "timeout": 0.5})
        assert error["kind"] == "timeout" and error["node_id"] == "lam"

        error = failure(client, {"name": "allocate", "event": {"mb": 512}, "memory": 64})
        assert error["kind"] == "memory"

        error = failure(client, {"name": "fail", "event": {"message": "bad input 7"}})
        assert error["kind"] == "exception" and error["type"] == "ValueError"
        assert "bad input 7" in error["message"] and "Traceback" in error["traceback"]

        # no node offers it: the master says so at once, listing the lambdas that exist
        error = failure(client, {"name": "no-such-lambda", "event": {}})
        assert error["kind"] == "unknown_lambda" and "no-such-lambda" in error["message"]
        assert "echo" in error["message"]

        # the node is still there and serving, lambdas and plain tasks alike
        assert client.dispatch_lambda({"name": "env", "event": {"name": "COLOUR"},
                                       "env": {"COLOUR": "teal"}}).result(timeout=30) == "teal"
        assert client.submit("echo", ["after"]).result(timeout=30) == "after"
        wait_until(lambda: any(n["node_id"] == "lam" and n["status"] in ("ready", "busy")
                               and n["tasks_failed"] == 3 for n in client.nodes()), 10,
                   message="the node's heartbeat counting the 3 failures it ran")


def test_user_lambda_from_a_module_given_with_dash_dash_lambda(fabric: Fabric,
                                                               tmp_path: Path) -> None:
    code = tmp_path / "usercode"
    code.mkdir()
    (code / "my_lambdas.py").write_text(USER_MODULE)
    fabric.master()
    # started from the module's directory: `--lambda` finds modules there, as a user's would be
    proc = Proc([sys.executable, "-m", "node.cli", "--broker", fabric.broker_url, "--root",
                 fabric.root, "--id", "user", "--heartbeat", "0.5",
                 "--lambda", "my_lambdas:lambda_handler"], tmp_path / "node-user.log", cwd=code)
    fabric.procs.append(proc)
    with fabric.client() as client:
        ready(client)
        value = client.dispatch_lambda({"name": "lambda_handler", "event": {"numbers": [1, 2, 39]},
                                        "env": {"GREETING": "hi"}, "memory": 128}).result(
            timeout=30)
    assert value == {"total": 42, "memory_limit_mb": 128, "greeting": "hi"}
