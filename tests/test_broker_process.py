"""The embedded broker as a process: READY line, signals, parent watch, and its Python handle."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from broker import (BrokerStartError, EmbeddedBroker, parse_config,
                    start_broker_process)
from support.brokers import (Probe, RawClient, connect_packet, free_port, publish_packet,
                             wait_until)

REPO = Path(__file__).resolve().parents[1]


def _run_cli(*args: str, cwd: Path = REPO) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "broker", *args], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_cli_prints_one_ready_line_and_exits_0_on_signal(sig: signal.Signals) -> None:
    process = _run_cli("--config", str(REPO / "broker.conf"), "--port", "0")
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.startswith("READY 127.0.0.1:"), line
        port = int(line.strip().rsplit(":", 1)[1])
        with Probe("127.0.0.1", port, "ready-check") as client:
            assert client.accepted
        process.send_signal(sig)
        stdout, _ = process.communicate(timeout=15)
        assert process.returncode == 0
        assert stdout == ""  # READY was the only line
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=10)


def test_broker_process_handle(tmp_path: Path) -> None:
    with start_broker_process(REPO / "broker.conf", port=0) as broker:
        assert broker.host == "127.0.0.1" and broker.port > 0
        assert broker.url == f"mqtt://127.0.0.1:{broker.port}"
        assert broker.pid == broker.popen.pid and broker.running()
        with Probe(broker.host, broker.port, "handle-check") as client:
            assert client.accepted
    assert broker.popen.returncode == 0
    crashed = start_broker_process(None, port=0)
    crashed.kill()
    assert crashed.popen.returncode == -signal.SIGKILL


def test_the_process_is_handed_the_parsed_config_not_the_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The config is read once, by the caller: here it is gone as soon as it was parsed, and
    the broker still comes up with its settings."""
    import broker.process as process
    path = tmp_path / "gone.conf"
    path.write_text("listener 1883 127.0.0.1\nallow_anonymous true\nmax_packet_size 300\n")
    parsed = process.load_config

    def load_then_remove(config_path: Path, **kwargs: object) -> object:
        config = parsed(config_path, **kwargs)  # type: ignore[arg-type]
        Path(config_path).unlink()
        return config
    monkeypatch.setattr(process, "load_config", load_then_remove)
    with start_broker_process(path, port=0) as started:
        assert not path.exists()
        with RawClient(started.host, started.port, "big") as client:
            client.send(publish_packet("t", b"x" * 400))  # over the file's max_packet_size
            assert client.wait_closed(5)


def test_password_and_acl_files_are_read_once_at_start(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The broker reads each file once as it starts and hands what it read to its plugins;
    a file is read again only when it changes (`test_users_added_while_running_can_connect`)."""
    from broker import AclFile, PasswordFile, add_user
    add_user(tmp_path / "passwd", "alice", "pw")
    add_user(tmp_path / "trusted", "master", "pw")
    (tmp_path / "acl").write_text("user alice\ntopic readwrite t/#\n")
    reads: list[str] = []

    def counted(load: Any) -> Any:
        def read(cls: type, path: Path) -> Any:
            reads.append(Path(path).name)
            return load(cls, path)
        return classmethod(read)
    monkeypatch.setattr(PasswordFile, "load", counted(PasswordFile.load.__func__))
    monkeypatch.setattr(AclFile, "load", counted(AclFile.load.__func__))

    async def scenario() -> int:
        config = parse_config("listener 1883 127.0.0.1\npassword_file passwd\nacl_file acl\n",
                              base_dir=tmp_path).with_port(0)
        config = config.with_overrides(trusted_file=tmp_path / "trusted")
        async with EmbeddedBroker(config) as embedded:
            host, port = embedded.addresses[0]
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(connect_packet("a", username="alice", password="pw"))
            connack = await asyncio.wait_for(reader.readexactly(4), 5)
            writer.close()
            return connack[3]
    assert asyncio.run(asyncio.wait_for(scenario(), 30)) == 0  # accepted
    assert sorted(reads) == ["acl", "passwd", "trusted"]


def test_busy_port_is_a_start_error_with_the_reason() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(BrokerStartError, match="address already in use"):
            start_broker_process(REPO / "broker.conf", port=port, timeout=15)


def test_broker_exits_when_its_parent_is_killed_with_sigkill(tmp_path: Path) -> None:
    """A master killed with -9 leaves no broker behind."""
    parent_code = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(REPO)!r})
        from broker import start_broker_process
        broker = start_broker_process({str(REPO / 'broker.conf')!r}, port=0,
                                      parent_pid=os.getpid())
        print(broker.pid, broker.port, flush=True)
        sys.stdin.read()  # wait until killed
    """)
    parent = subprocess.Popen([sys.executable, "-c", parent_code], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        broker_pid, port = (int(x) for x in parent.stdout.readline().split())
        assert RawClient("127.0.0.1", port, "orphan-check").connack_code == 0
        parent.kill()
        parent.wait(10)
        assert wait_until(lambda: not _process_exists(broker_pid), 10.0), \
            "the broker outlived its parent"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait(10)
        if parent.stdin is not None:
            parent.stdin.close()


def _process_exists(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def test_pid_file_and_log_file(tmp_path: Path) -> None:
    config = tmp_path / "b.conf"
    config.write_text("listener 1883 127.0.0.1\nallow_anonymous true\npid_file broker.pid\n"
                      "log_dest file broker.log\nlog_type all\n")
    with start_broker_process(config, port=0, cwd=tmp_path) as broker:
        assert (tmp_path / "broker.pid").read_text().strip() == str(broker.pid)
        with Probe(broker.host, broker.port, "log-check") as client:
            assert client.accepted
    assert not (tmp_path / "broker.pid").exists()
    assert "client log-check connected" in (tmp_path / "broker.log").read_text()


def test_accepted_sockets_have_tcp_nodelay() -> None:
    async def scenario() -> int:
        config = parse_config("listener 1883 127.0.0.1\nallow_anonymous true\n").with_port(0)
        async with EmbeddedBroker(config) as embedded:
            host, port = embedded.addresses[0]
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(connect_packet("nodelay-check"))
            assert (await asyncio.wait_for(reader.readexactly(4), 5))[0] == 0x20
            session, handler = embedded.broker.sessions["nodelay-check"]
            server_socket = handler.writer._writer.get_extra_info("socket")
            flag = server_socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            writer.close()
            return flag
    assert asyncio.run(asyncio.wait_for(scenario(), 30)) == 1


def test_client_without_connect_is_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    """A socket that never sends CONNECT is closed (after CONNECT_TIMEOUT, shortened here)."""
    import broker.fixes as fixes
    monkeypatch.setattr(fixes, "CONNECT_TIMEOUT", 0.5)

    async def scenario() -> bytes:
        config = parse_config("listener 1883 127.0.0.1\nallow_anonymous true\n").with_port(0)
        async with EmbeddedBroker(config) as embedded:
            host, port = embedded.addresses[0]
            reader, writer = await asyncio.open_connection(host, port)
            data = await asyncio.wait_for(reader.read(10), 5)
            writer.close()
            return data
    assert asyncio.run(asyncio.wait_for(scenario(), 30)) == b""


def test_default_config_is_local_only_anonymous() -> None:
    port = free_port()
    with start_broker_process(None, port=port) as broker:
        assert (broker.host, broker.port) == ("127.0.0.1", port)
        with Probe(broker.host, broker.port, "default-check") as client:
            assert client.accepted


def test_protocol_error_ends_the_session_with_its_will(tmp_path: Path) -> None:
    """amqtt left the session of a client it cut off for publishing to `$...` "connected",
    with no will; the embedded broker ends it like any abnormal disconnect."""
    from support.brokers import publish_packet, start_embedded
    with start_embedded("listener 1883 127.0.0.1\nallow_anonymous true\n",
                        directory=tmp_path) as broker, \
            Probe(broker.host, broker.port, "watch") as watcher:
        assert watcher.subscribe("will/#", 1) == [1]
        with RawClient(broker.host, broker.port, "rude", will=("will/rude", b"gone", 1, False)) \
                as rude:
            rude.send(publish_packet("$SYS/forged", b"x"))
            assert rude.wait_closed(5.0)
        assert watcher.wait_message("will/rude") is not None
        with RawClient(broker.host, broker.port, "rude") as again:
            assert again.connack_code == 0
        assert [m.payload for m in watcher.received("will/rude")] == [b"gone"]
