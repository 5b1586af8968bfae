"""The mosquitto-syntax config: parsing, errors that name file and line, and the repo's
broker.conf accepted, unchanged, by both brokers."""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

import pytest

from broker import (BrokerConfig, BrokerConfigError, Listener, load_config,
                    parse_config, start_broker_process)
from core.mqtt import TlsSettings
from support.brokers import (MOSQUITTO, Probe, free_port, mosquitto_available, start_embedded,
                             start_mosquitto, with_listener_port)

REPO = Path(__file__).resolve().parents[1]
needs_mosquitto = pytest.mark.skipif(not mosquitto_available(), reason=f"{MOSQUITTO} missing")


# -- parsing ---------------------------------------------------------------------------------

def test_repo_broker_conf_parses_to_a_loopback_anonymous_listener() -> None:
    config = load_config(REPO / "broker.conf")
    assert config.listeners == (Listener(1883, "127.0.0.1", line=config.listeners[0].line),)
    assert config.listeners[0].is_loopback
    assert config.allow_anonymous is True
    assert config.max_packet_size == 1_048_576
    assert config.set_tcp_nodelay is True
    assert config.persistence is False
    assert config.password_file is None and config.acl_file is None
    assert config.source == REPO / "broker.conf"


def test_no_listener_means_mosquittos_local_only_mode() -> None:
    config = parse_config("# nothing\n\n")
    assert config.listeners == (Listener(1883, "127.0.0.1"),)
    assert config.allow_anonymous is True
    assert parse_config("allow_anonymous false\n").allow_anonymous is False


def test_a_listener_turns_anonymous_access_off_unless_asked() -> None:
    assert parse_config("listener 1883\n").allow_anonymous is False
    assert parse_config("listener 1883\nallow_anonymous true\n").allow_anonymous is True


def test_listener_options_follow_their_listener(tmp_path: Path) -> None:
    text = ("listener 1883 127.0.0.1\n"
            "listener 8883\n"
            "certfile tls/server.crt\n"
            "keyfile /abs/server.key\n"
            "cafile tls/ca.crt\n"
            "require_certificate true\n"
            "tls_version tlsv1.2\n"
            "listener 9883 ::1\n"
            "socket_domain ipv6\n")
    config = parse_config(text, base_dir=tmp_path)
    plain, secure, v6 = config.listeners
    assert plain.tls is None and plain.is_loopback
    assert secure.bind_address is None and not secure.is_loopback
    assert secure.connect_host == "127.0.0.1"
    assert secure.tls is not None
    assert secure.tls.cert_file == str(tmp_path / "tls/server.crt")  # relative: working dir
    assert secure.tls.key_file == "/abs/server.key"
    assert secure.tls.ca_file == str(tmp_path / "tls/ca.crt")
    assert secure.tls.require_certificate is True
    assert secure.tls.tls_version == "tlsv1.2"
    assert v6.is_loopback and v6.socket_domain == "ipv6"
    assert config.remote_listeners == (secure,)
    assert type(secure.tls) is TlsSettings  # one TLS type, for clients and listeners alike


def test_parsed_settings_survive_their_json_for_the_broker_process(tmp_path: Path) -> None:
    """What `start_broker_process` hands the process instead of the file (`to_json`)."""
    text = ("listener 1883 127.0.0.1\nlistener 8883\ncertfile c.crt\nkeyfile k.key\n"
            "password_file passwd\nlog_dest file b.log\nlog_type debug\n")
    config = parse_config(text, source=tmp_path / "b.conf", base_dir=tmp_path).with_port(0)
    copy = BrokerConfig.from_json(config.to_json())
    assert copy == config and copy.source == config.source
    assert copy.password_file == tmp_path / "passwd" and copy.log_types == ("debug",)
    with pytest.raises(BrokerConfigError, match="not those of to_json"):
        BrokerConfig.from_json('{"listeners": [{"port": 1}], "no_such": 1}')


def test_paths_resolve_against_the_working_directory_like_mosquitto(tmp_path: Path) -> None:
    config = parse_config("password_file passwd\nacl_file /etc/acl\npid_file run/b.pid\n",
                          base_dir=tmp_path)
    assert config.password_file == tmp_path / "passwd"
    assert config.acl_file == Path("/etc/acl")
    assert config.pid_file == tmp_path / "run/b.pid"
    # load_config uses the working directory too, not the file's own directory
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.conf").write_text("password_file passwd\n")
    assert load_config(tmp_path / "sub" / "b.conf", base_dir=tmp_path).password_file == \
        tmp_path / "passwd"


def test_values_and_logging_settings() -> None:
    config = parse_config("listener 1 127.0.0.1\nmax_keepalive 30\nmax_queued_messages 0\n"
                          "log_dest stdout\nlog_dest file /tmp/b.log\nlog_type debug\n"
                          "log_timestamp false\nlog_timestamp_format %Y\n"
                          "connection_messages false\nsys_interval 0\npersistence false\n"
                          "persistence_location /var/lib/x/\nautosave_interval 10\n"
                          "check_retain_source true\nupgrade_outgoing_qos false\n"
                          "max_connections -1\nprotocol mqtt\n")
    assert config.max_keepalive == 30 and config.max_queued_messages == 0
    assert config.log_dest == ("stdout", "file") and config.log_file == Path("/tmp/b.log")
    assert config.log_types == ("debug",)
    assert config.log_timestamp is False and config.log_timestamp_format == "%Y"
    assert config.connection_messages is False


def test_config_is_frozen_and_overridden_by_copy() -> None:
    config = parse_config("listener 1883 127.0.0.1\nlistener 8883\n")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.allow_anonymous = True  # type: ignore[misc]
    moved = config.with_port(0)
    assert moved.listeners[0].port == 0 and config.listeners[0].port == 1883
    assert config.with_port(9999, listener=1).listeners[1].port == 9999
    assert config.with_bind("0.0.0.0").listeners[0].bind_address == "0.0.0.0"
    assert config.with_overrides(allow_anonymous=True).allow_anonymous is True
    with pytest.raises(BrokerConfigError, match="no such setting"):
        config.with_overrides(allow_anonymos=True)
    with pytest.raises(BrokerConfigError, match="port override"):
        config.with_port(70000)
    with pytest.raises(BrokerConfigError, match="no listener #5"):
        config.with_port(1, listener=5)
    assert isinstance(config, BrokerConfig)


# -- errors name file, line and directive ----------------------------------------------------

@pytest.mark.parametrize("line,message", [
    ("bogus_directive 1", "bogus_directive: unknown directive"),
    ("allow_anonymous yes", "allow_anonymous: invalid value 'yes'"),
    ("allow_anonymous", "allow_anonymous: missing value"),
    ("max_packet_size 10", "max_packet_size: invalid value 10"),
    ("max_packet_size abc", "max_packet_size: invalid value 'abc'"),
    ("  # indented comment", "#: unknown directive"),
    ("listener", "listener: missing port"),
    ("password_file a\npassword_file b", "password_file: given twice"),
    ("persistence true", "persistence: true is not supported by the embedded broker"),
    ("per_listener_settings true", "per_listener_settings: true is not supported"),
    ("include_dir /etc/x", "include_dir: known to mosquitto but not supported"),
    ("auth_opt_db_host x", "auth_opt_db_host: known to mosquitto but not supported"),
    ("log_dest syslog", "log_dest: syslog is not supported"),
    ("sys_interval 10", "sys_interval: the embedded broker publishes no $SYS tree"),
    ("protocol websockets", "protocol: websockets is not supported"),
    ("listener 0 /tmp/mqtt.sock", "listener: unix socket listeners are not supported"),
    ("allow_anonymous\ttrue", "contains a tab"),
])
def test_errors_name_file_line_and_directive(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "broker.conf"
    path.write_text(f"# header\nlistener 1883 127.0.0.1\n{line}\n")
    with pytest.raises(BrokerConfigError) as error:
        load_config(path)
    text = str(error.value)
    assert text.startswith(f"{path}:{2 + len(line.splitlines())}: "), text
    assert message in text, text


def test_listener_options_need_a_listener_and_complete_tls() -> None:
    with pytest.raises(BrokerConfigError, match=r"<config>:1: certfile: must follow"):
        parse_config("certfile /x.crt\n")
    with pytest.raises(BrokerConfigError, match=r":1: listener: TLS needs both"):
        parse_config("listener 8883\ncertfile /x.crt\n")
    with pytest.raises(BrokerConfigError, match=r":1: listener: require_certificate true"):
        parse_config("listener 8883\ncertfile /x\nkeyfile /y\nrequire_certificate true\n")
    with pytest.raises(BrokerConfigError, match=r":2: listener: duplicates the listener on "
                                                 r"line 1"):
        parse_config("listener 8883\nlistener 8883\n")


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(BrokerConfigError, match="cannot read broker config"):
        load_config(tmp_path / "absent.conf")


@needs_mosquitto
@pytest.mark.parametrize("line", ["bogus_directive 1", "allow_anonymous yes",
                                  "max_packet_size 10", "  # indented comment", "listener",
                                  "password_file a\npassword_file b"])
def test_mosquitto_refuses_what_the_parser_refuses(tmp_path: Path, line: str) -> None:
    """The parser is never laxer than mosquitto on these: both refuse the file."""
    path = tmp_path / "bad.conf"
    path.write_text(f"listener {free_port()} 127.0.0.1\n{line}\n")
    with pytest.raises(BrokerConfigError):
        load_config(path)
    try:
        result = subprocess.run([str(MOSQUITTO), "-c", str(path)], capture_output=True,
                                timeout=10)
    except subprocess.TimeoutExpired:
        pytest.fail(f"mosquitto accepted {line!r}")
    assert result.returncode != 0
    assert f"{path}:{1 + len(line.splitlines())}" in result.stderr.decode() + \
        result.stdout.decode()


# -- both brokers run the repo's broker.conf -------------------------------------------------

def test_embedded_broker_runs_the_repo_broker_conf() -> None:
    with start_embedded(REPO / "broker.conf", port=0) as broker:
        assert broker.host == "127.0.0.1"
        with Probe(broker.host, broker.port, "conf-check") as client:
            assert client.accepted
            assert client.subscribe("conf/check", 1) == [1]
            client.publish("conf/check", b"ok", qos=1)
            assert client.wait_message("conf/check") is not None


@needs_mosquitto
def test_mosquitto_runs_the_repo_broker_conf_unchanged_but_for_the_port(tmp_path: Path) -> None:
    text = (REPO / "broker.conf").read_text()
    port = free_port()
    assert with_listener_port(text, port).replace(str(port), "1883", 1) == text
    with start_mosquitto(text, port, directory=tmp_path) as broker:
        with Probe(broker.host, broker.port, "conf-check") as client:
            assert client.accepted
            assert client.subscribe("conf/check", 1) == [1]
            client.publish("conf/check", b"ok", qos=1)
            assert client.wait_message("conf/check") is not None
        assert "Error" not in broker.log_text()


def test_start_broker_process_reports_config_errors_in_the_caller(tmp_path: Path) -> None:
    path = tmp_path / "bad.conf"
    path.write_text("listener 1883 127.0.0.1\nallow_anonymous maybe\n")
    with pytest.raises(BrokerConfigError, match=rf"{path}:2: allow_anonymous"):
        start_broker_process(path, port=0)


def test_cli_exits_2_with_the_error_for_a_bad_config(tmp_path: Path) -> None:
    import sys
    path = tmp_path / "bad.conf"
    path.write_text("listener 1883 127.0.0.1\nfrobnicate on\n")
    result = subprocess.run([sys.executable, "-m", "broker", "--config", str(path)],
                            capture_output=True, text=True, timeout=30, cwd=REPO)
    assert result.returncode == 2
    assert result.stdout.startswith(f"ERROR {path}:2: frobnicate: unknown directive")
    assert f"{path}:2: frobnicate" in result.stderr
