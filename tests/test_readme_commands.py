"""README's shell commands, extracted from the README itself and run against a real master,
so the README cannot drift: a new command there is either run here or listed with the
reason it is not."""

from __future__ import annotations

import re
import shlex
import signal
import subprocess
from pathlib import Path

import pytest

from support.brokers import free_port
from support.fabric import REPO, Proc, child_env

README = REPO / "README.md"

# Commands a test cannot run here, each with the reason (matched as a prefix).
NOT_RUN = {
    "python3 -m pip install": "installs the package (the test environment has it)",
    "bash scripts/run_tests.sh": "runs this very suite",
    "scripts/start_system.sh": "runs on the fixed port 1883; tests/test_system_scripts.py runs it",
    "scripts/stop_system.sh": "see scripts/start_system.sh",
    "tail -f": "follows a log forever",
    "kill -9 $(cat logs/": "part of the start_system.sh walk-through",
    "python scripts/deploy_esp32.py": "needs a board on a serial port",
    "mpremote connect": "needs a board on a serial port",
    "python3 -m broker": "the fixed port 1883; tests/test_broker_process.py runs it",
    "master-node serve --replica": "replicated masters on their own broker; "
                                   "tests/test_replication.py",
    "master-node pipelines list | run NAME": "a synopsis of the pipelines subcommands",
    "master-node pipelines submit oneoff.toml": "a pipeline file of one's own; the pipelines "
                                                "tests submit one",
}
SERVERS = ("master-node serve", "compute-node")  # run in the background, until the end


def _split_comment(line: str) -> tuple[str, str]:
    """(command, comment): a `#` after a space and outside quotes starts the comment."""
    quote = ""
    for index, char in enumerate(line):
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (index == 0 or line[index - 1].isspace()):
            return line[:index].strip(), line[index + 1:].strip()
    return line.strip(), ""


def readme_commands(text: str) -> list[str]:
    """Every command line of README's ```bash blocks (continuations joined), as written,
    with its comment after a tab."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            command, comment = _split_comment(line)
            if command:
                command = " ".join(command.split()) if "'" not in command else command
                commands.append(command + ("\t" + comment if comment else ""))
    return commands


def _excluded(command: str) -> bool:
    return any(command.startswith(prefix) for prefix in NOT_RUN)


def test_every_readme_command_is_run_or_excused() -> None:
    commands = [c.split("\t")[0] for c in readme_commands(README.read_text())]
    assert len(commands) > 10
    unknown = [c for c in commands if not _excluded(c) and not c.startswith(
        ("master-node ", "compute-node", "python scripts/generate_numbers.py"))]
    assert not unknown, f"README commands no test runs or excuses: {unknown}"
    stale = [p for p in NOT_RUN if not any(c.startswith(p) for c in commands)]
    assert not stale, f"excuses for commands no longer in README: {stale}"


def _python_block(text: str, marker: str) -> str:
    for block in re.findall(r"```python\n(.*?)```", text, re.S):
        if block.startswith(marker):
            return block
    raise AssertionError(f"README has no python block starting {marker!r}")


def test_readme_commands_run_against_a_real_master(tmp_path: Path) -> None:
    text = README.read_text()
    port = free_port()
    env = dict(child_env(), FABRIC_BROKER=f"mqtt://127.0.0.1:{port}")
    (tmp_path / "mytasks.py").write_text(_python_block(text, "# mytasks.py").replace(
        "    ...", "    return [path, width]"))
    (tmp_path / "mymodule.py").write_text(
        "def lambda_handler(event, context):\n    return {'got': event}\n")
    procs: list[Proc] = []
    ran = []

    def background(command: str, ready: str) -> Proc:
        args = shlex.split(command)
        proc = Proc(["bash", "-c", shlex.join(args)], tmp_path / f"bg-{len(procs)}.log",
                    cwd=tmp_path)
        procs.append(proc)
        proc.wait_for_output(ready, timeout=60)
        return proc

    (tmp_path / "scripts").symlink_to(REPO / "scripts")  # README runs them from the checkout
    try:
        for line in readme_commands(text):
            command, _, comment = line.partition("\t")
            if _excluded(command):
                continue
            if command == "master-node serve":
                background(f"{command} --port {port} --state state", "master ready")
            elif command.startswith("master-node serve "):
                other = free_port()
                (tmp_path / "examples").mkdir(exist_ok=True)
                if "examples/" in command:
                    (tmp_path / "examples" / "pipelines.toml").write_text(
                        (REPO / "examples" / "pipelines.toml").read_text())
                proc = background(f"{command} --port {other} --state state-{other}",
                                  "master ready")
                proc.signal(signal.SIGTERM)
                assert proc.popen.wait(30) == 0
            elif command.startswith("compute-node"):
                background(f"{command} --broker mqtt://127.0.0.1:{port}", "ready on")
            elif command.startswith("master-node dashboard"):
                proc = background(f"{command} --listen 127.0.0.1:{free_port()} "
                                  f"--broker mqtt://127.0.0.1:{port}", "dashboard on")
                proc.signal(signal.SIGTERM)
                assert proc.popen.wait(30) == 0
            else:
                result = subprocess.run(["bash", "-c", command], capture_output=True, text=True,
                                        cwd=tmp_path, env=env, timeout=180)
                assert result.returncode == 0, (command, result.stdout, result.stderr)
                expected = re.match(r"prints (.*)", comment)
                if expected:
                    assert result.stdout.strip() == expected.group(1), (command, result.stdout)
            ran.append(command)
    finally:
        for proc in reversed(procs):
            proc.signal(signal.SIGTERM)
        for proc in reversed(procs):
            try:
                proc.popen.wait(30)
            finally:
                proc.cleanup()
    assert "master-node submit resize /data/a.png 640" in ran
    assert any(c.startswith("master-node primes") for c in ran)
    assert (tmp_path / "primes.txt").stat().st_size > 0


@pytest.mark.parametrize("line, words", [
    ("master-node submit echo '{\"a\": 1}'   # prints {\"a\": 1}", "master-node submit echo"),
])
def test_extraction_keeps_quotes_and_comments(line: str, words: str) -> None:
    (command,) = readme_commands(f"```bash\n{line}\n```")
    assert command.startswith(words) and command.endswith('\tprints {"a": 1}')
