"""The node's task registry: names, and the default time limit a task is registered with."""

from __future__ import annotations

import pytest

from core.errors import ConfigError
from node.registry import TaskRegistry


def test_a_default_time_limit_is_kept_per_name_and_found_on_a_decorated_function() -> None:
    registry = TaskRegistry()

    @registry.register(timeout=2.5)
    def slow() -> None: ...

    registry.add("plain", lambda: None)
    assert (registry.timeout("slow"), registry.timeout("plain"), registry.timeout("nope")) == \
        (2.5, 0.0, 0.0)
    other = TaskRegistry()
    other.add("slow", slow)  # as `--task module:slow` registers it
    assert other.timeout("slow") == 2.5
    other.add("slow", slow, timeout=0)  # an explicit 0 takes the default away
    assert other.timeout("slow") == 0.0
    assert registry.copy().timeout("slow") == 2.5


@pytest.mark.parametrize("bad", [-1, float("inf"), float("nan"), "5", True])
def test_a_bad_default_time_limit_is_refused_by_name(bad: object) -> None:
    with pytest.raises(ConfigError, match="task 'slow': timeout must be"):
        TaskRegistry().add("slow", lambda: None, timeout=bad)  # type: ignore[arg-type]


def test_a_registered_retry_policy_is_checked_and_kept_per_name() -> None:
    registry = TaskRegistry()

    @registry.register(retry={"max_attempts": 5, "backoff": 1, "retry_on": "timeout"})
    def flaky() -> None: ...

    assert registry.retry("flaky") == {"max_attempts": 5, "backoff": 1.0, "retry_on": ["timeout"]}
    assert registry.retry("other") is None
    other = TaskRegistry()
    other.add("flaky", flaky)  # as `--task module:flaky` registers it
    assert other.retry("flaky") == registry.retry("flaky")


@pytest.mark.parametrize("bad", [{"max_attempts": 0.5}, {"backoff": -1}, {"retry_on": [1]},
                                 {"attempts": 3}, "3 times"])
def test_a_bad_retry_policy_is_refused_when_the_node_starts(bad: object) -> None:
    with pytest.raises(ConfigError, match="task 'flaky'"):
        TaskRegistry().add("flaky", lambda: None, retry=bad)  # type: ignore[arg-type]


def test_the_node_serves_the_builtins_under_its_own_tasks() -> None:
    from node.builtin_tasks import BUILTIN_TASKS, echo, with_builtins

    def mine(value: object = None) -> str:
        return "mine"

    own = TaskRegistry()
    own.add("echo", mine, timeout=2.0)
    own.add("extra", mine)
    served = with_builtins(own)
    assert served.names() == sorted(set(BUILTIN_TASKS) | {"extra"})
    assert served.get("echo") is mine and served.timeout("echo") == 2.0  # the user's wins
    assert served.get("sleep") is BUILTIN_TASKS["sleep"]
    assert own.names() == ["echo", "extra"]  # a copy: the user's registry is left as it was
    assert with_builtins(TaskRegistry()).get("echo") is echo


def test_load_task_words_a_missing_module_and_leaves_other_import_failures_raw(
        tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    import uuid

    from node.registry import load_task
    monkeypatch.syspath_prepend(str(tmp_path))
    tag = uuid.uuid4().hex[:8]
    (tmp_path / f"good_{tag}.py").write_text("def job():\n    return 1\n")
    (tmp_path / f"needs_dep_{tag}.py").write_text(f"import missing_dependency_{tag}\n")
    (tmp_path / f"broken_{tag}.py").write_text("raise ValueError('bad config')\n")
    registry = TaskRegistry()
    assert load_task(f"good_{tag}:job", registry=registry) == "job"
    assert registry.get("job")() == 1
    with pytest.raises(ConfigError, match=f"no module named 'absent_{tag}' \\(looked in"):
        load_task(f"absent_{tag}:job", registry=registry)
    with pytest.raises(ConfigError, match=f"needs module 'missing_dependency_{tag}', which is"):
        load_task(f"needs_dep_{tag}:job", registry=registry)
    with pytest.raises(ValueError, match="bad config"):  # user code's own error, as it was
        load_task(f"broken_{tag}:job", registry=registry)
