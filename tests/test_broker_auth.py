"""One password file and one acl_file for both brokers: mosquitto's formats, enforced alike."""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import stat
import subprocess
import uuid
from pathlib import Path
from typing import Iterator

import pytest

from broker import (AclFile, Access, BrokerConfigError, PasswordFile, PasswordFileError,
                    add_user, check_password, hash_password, remove_user,
                    start_broker_process, verify)
from support.brokers import (BrokerHandle, Probe, RawClient, broker_params, start_broker,
                             start_embedded)

REPO = Path(__file__).resolve().parents[1]
MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
has_mosquitto_passwd = pytest.mark.skipif(not os.access(MOSQUITTO_PASSWD, os.X_OK),
                                          reason="mosquitto_passwd not installed")


# -- the password file -----------------------------------------------------------------------

def test_hash_is_mosquitto_2_pbkdf2_sha512() -> None:
    hashed = hash_password("s3cret", salt=b"0123456789ab")
    prefix, seven, iterations, salt, digest = hashed.split("$")
    assert (prefix, seven, iterations) == ("", "7", "101")
    assert base64.b64decode(salt) == b"0123456789ab"
    assert base64.b64decode(digest) == hashlib.pbkdf2_hmac("sha512", b"s3cret",
                                                           b"0123456789ab", 101)
    assert check_password("s3cret", hashed)
    assert not check_password("s3cret!", hashed)
    assert hash_password("s3cret") != hash_password("s3cret")  # fresh salt each time


def test_legacy_sha512_hashes_still_verify() -> None:
    salt = b"saltsaltsaltsalt"
    legacy = "$6${}${}".format(base64.b64encode(salt).decode(),
                               base64.b64encode(hashlib.sha512(b"pw" + salt).digest()).decode())
    assert check_password("pw", legacy)
    assert not check_password("other", legacy)
    assert not check_password("pw", "$7$notanumber$x$y")
    assert not check_password("pw", "plain")


def test_add_replace_remove_users(tmp_path: Path) -> None:
    path = tmp_path / "passwd"
    add_user(path, "alice", "one")
    add_user(path, "bob", "two")
    add_user(path, "alice", "three")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert PasswordFile.load(path).users == ("alice", "bob")
    assert verify(path, "alice", "three") and not verify(path, "alice", "one")
    assert verify(path, "bob", "two")
    assert not verify(path, "carol", "two")
    assert remove_user(path, "bob") and not remove_user(path, "bob")
    assert PasswordFile.load(path).users == ("alice",)


def test_bad_input_is_refused_with_its_line(tmp_path: Path) -> None:
    with pytest.raises(PasswordFileError, match="invalid username"):
        add_user(tmp_path / "p", "a:b", "pw")
    with pytest.raises(PasswordFileError, match="non-empty"):
        add_user(tmp_path / "p", "a", "")
    path = tmp_path / "broken"
    path.write_text("alice:$7$101$c2FsdA==$aGFzaA==\nbob:plaintext\n")
    with pytest.raises(PasswordFileError, match=rf"{path}:2"):
        PasswordFile.load(path)
    with pytest.raises(PasswordFileError, match="cannot read"):
        PasswordFile.load(tmp_path / "absent")


@has_mosquitto_passwd
def test_files_written_by_mosquitto_passwd_verify(tmp_path: Path) -> None:
    path = tmp_path / "passwd"
    subprocess.run([MOSQUITTO_PASSWD, "-c", "-b", str(path), "carol", "pa ss:word"], check=True,
                   timeout=30)
    subprocess.run([MOSQUITTO_PASSWD, "-b", str(path), "dave", "x"], check=True, timeout=30)
    assert verify(path, "carol", "pa ss:word")
    assert verify(path, "dave", "x")
    assert not verify(path, "dave", "y")
    add_user(path, "erin", "e")  # and our writer keeps their lines
    assert verify(path, "carol", "pa ss:word") and verify(path, "erin", "e")


# -- the ACL file ----------------------------------------------------------------------------

def test_acl_follows_mosquittos_rules() -> None:
    acl = AclFile.parse("topic read public/#\n"
                        "user alice\n"
                        "topic readwrite a/#\n"
                        "topic deny a/secret\n"
                        "topic b/plain\n"
                        "pattern write dev/%u/out\n"
                        "pattern read dev/%c/in\n"
                        "pattern read $SYS/%c/#\n")

    def allows(user: str | None, cid: str, topic: str, access: Access) -> bool:
        return acl.allows(username=user, client_id=cid, topic=topic, access=access)

    assert allows(None, "anon", "public/x", Access.READ)
    assert not allows(None, "anon", "public/x", Access.WRITE)
    assert not allows(None, "anon", "a/x", Access.READ)
    assert allows("alice", "c1", "a/x/y", Access.WRITE)
    assert not allows("alice", "c1", "a/secret", Access.READ)  # deny beats the earlier grant
    assert allows("alice", "c1", "b/plain", Access.WRITE)  # no access word: readwrite
    assert not allows("alice", "c1", "public/x", Access.READ)  # anonymous rules are not hers
    assert allows("alice", "c1", "dev/alice/out", Access.WRITE)
    assert not allows("alice", "c1", "dev/bob/out", Access.WRITE)
    assert allows("bob", "c2", "dev/c2/in", Access.READ)
    assert not allows(None, "c3", "dev/c3/out", Access.WRITE)  # %u needs a username
    assert allows(None, "c3", "dev/c3/in", Access.READ)
    assert not allows("x/y", "c4", "dev/x/y/out", Access.WRITE)  # a '/' in the name: denied
    assert not allows("bob", "c+", "dev/c+/in", Access.READ)
    assert allows("bob", "c5", "$SYS/c5/load", Access.READ)
    assert not allows("alice", "c1", "$SYS/c1/x", Access.WRITE)


def test_acl_errors_name_the_line(tmp_path: Path) -> None:
    with pytest.raises(BrokerConfigError, match=r"<acl>:2: topic: invalid access 'rw'"):
        AclFile.parse("user a\ntopic rw x/y\n")
    with pytest.raises(BrokerConfigError, match=r"<acl>:1: user: missing username"):
        AclFile.parse("user\n")
    with pytest.raises(BrokerConfigError, match=r":1: usr: unknown keyword"):
        AclFile.parse("usr a\n")


# -- both brokers ----------------------------------------------------------------------------

@pytest.fixture(params=broker_params())
def kind(request: pytest.FixtureRequest) -> str:
    return request.param


def _broker(kind: str, directory: Path, config: str) -> BrokerHandle:
    return start_broker(kind, "listener 1883 127.0.0.1\n" + config, directory=directory)


def _connect(broker: BrokerHandle, client_id: str, user: str | None = None,
             password: str | None = None) -> Probe:
    return Probe(broker.host, broker.port, client_id, username=user, password=password)


@pytest.mark.parametrize("allow_anonymous", [False, True])
def test_password_file_decides_who_connects(kind: str, tmp_path: Path,
                                            allow_anonymous: bool) -> None:
    add_user(tmp_path / "passwd", "alice", "alice-pw")
    config = f"allow_anonymous {str(allow_anonymous).lower()}\npassword_file passwd\n"
    with _broker(kind, tmp_path, config) as broker:
        with _connect(broker, "c-good", "alice", "alice-pw") as good:
            assert good.accepted
        for client_id, user, password in [("c-wrong", "alice", "nope"),
                                          ("c-unknown", "mallory", "x"),
                                          ("c-nopass", "alice", None)]:
            with _connect(broker, client_id, user, password) as refused:
                assert refused.connect_rc == 5, (user, password, refused.connect_rc)
        with _connect(broker, "c-anon") as anonymous:
            assert anonymous.accepted is allow_anonymous
            if not allow_anonymous:
                assert anonymous.connect_rc == 5


def test_no_password_file_and_no_anonymous_refuses_everyone(kind: str, tmp_path: Path) -> None:
    with _broker(kind, tmp_path, "allow_anonymous false\n") as broker:
        for user in (None, "alice"):
            with _connect(broker, f"c-{user}", user, "pw" if user else None) as client:
                assert client.connect_rc == 5


@pytest.fixture
def fabric_acl_broker(kind: str, tmp_path: Path) -> Iterator[BrokerHandle]:
    """The repo's broker.acl.example with a master, an admin and two nodes."""
    shutil.copy(REPO / "broker.acl.example", tmp_path / "broker.acl")
    for user in ("master", "admin", "n1", "n2"):
        add_user(tmp_path / "passwd", user, f"{user}-pw")
    config = "allow_anonymous false\npassword_file passwd\nacl_file broker.acl\n"
    with _broker(kind, tmp_path, config) as broker:
        yield broker


def test_nodes_are_confined_to_their_own_topics(fabric_acl_broker: BrokerHandle) -> None:
    broker = fabric_acl_broker
    root = "fabric"
    with _connect(broker, "master", "master", "master-pw") as master, \
            _connect(broker, "n1", "n1", "n1-pw") as n1, \
            _connect(broker, "n2", "n2", "n2-pw") as n2:
        assert master.accepted and n1.accepted and n2.accepted
        assert master.subscribe(f"{root}/#", 1) == [1]
        # subscriptions are granted (as mosquitto grants them); reads are checked per message
        assert n1.subscribe(f"{root}/#", 1) == [1]

        n1.publish(f"{root}/nodes/n2/status", b"forged", qos=1)
        n1.publish(f"{root}/results/n2", b"forged", qos=1)
        n1.publish(f"{root}/nodes/n1/status", b"alive", qos=1)
        n1.publish(f"{root}/results/n1", b"result", qos=1)
        assert master.wait_for(lambda msgs: any(m.topic == f"{root}/results/n1" for m in msgs))
        assert [(m.topic, m.payload) for m in master.messages] == [
            (f"{root}/nodes/n1/status", b"alive"), (f"{root}/results/n1", b"result")]

        master.publish(f"{root}/nodes/n2/tasks", b"for n2", qos=1)
        master.publish(f"{root}/nodes/n1/tasks", b"for n1", qos=1)
        assert n1.wait_message(f"{root}/nodes/n1/tasks") is not None
        assert [(m.topic, m.payload) for m in n1.messages] == [
            (f"{root}/nodes/n1/tasks", b"for n1")], "n1 read more than its own tasks"

    with _connect(broker, "admin-tool", "admin", "admin-pw") as admin:
        assert admin.subscribe(f"{root}/nodes/+/tasks", 1) == [1]
        admin.publish(f"{root}/nodes/n9/tasks", b"x", qos=1)
        assert admin.wait_message(f"{root}/nodes/n9/tasks") is not None


def test_denied_retained_message_is_neither_stored_nor_sent(
        fabric_acl_broker: BrokerHandle) -> None:
    broker = fabric_acl_broker
    with _connect(broker, "n1", "n1", "n1-pw") as n1:
        n1.publish("fabric/nodes/n2/status", b"forged", qos=1, retain=True)
        n1.publish("fabric/nodes/n1/status", b"mine", qos=1, retain=True)
    with _connect(broker, "master", "master", "master-pw") as master:
        assert master.subscribe([("fabric/nodes/n2/status", 1), ("fabric/nodes/n1/status", 1)]) \
            == [1, 1]
        assert master.wait_message("fabric/nodes/n1/status") is not None
        assert master.received("fabric/nodes/n2/status") == []
        master.publish("fabric/nodes/n1/status", b"", qos=1, retain=True)


# -- embedded broker only --------------------------------------------------------------------

def test_users_added_while_running_can_connect(tmp_path: Path) -> None:
    add_user(tmp_path / "passwd", "first", "pw")
    with start_embedded("listener 1883 127.0.0.1\nallow_anonymous false\npassword_file passwd\n",
                        directory=tmp_path) as broker:
        with _connect(broker, "late-1", "late", "pw") as client:
            assert client.connect_rc == 5
        add_user(tmp_path / "passwd", "late", "pw")
        with _connect(broker, "late-2", "late", "pw") as client:
            assert client.accepted


def test_anonymous_access_on_a_network_listener_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "open.conf"
    path.write_text("listener 1883\nallow_anonymous true\n")
    with pytest.raises(BrokerConfigError, match=r"allow_anonymous true with listener\(s\) "
                                                r"other machines can reach \(\*:0\)"):
        start_broker_process(path, port=0)
    # an explicit override starts it, with a loud warning
    log = tmp_path / "broker.log"
    with open(log, "wb") as stderr:
        process = start_broker_process(path, port=0, allow_remote_anonymous=True, stderr=stderr)
    try:
        with _connect_url(process.host, process.port) as client:
            assert client.accepted
    finally:
        assert process.stop() == 0
    assert "ANONYMOUS ACCESS FROM THE NETWORK IS ON" in log.read_text()


def _connect_url(host: str, port: int) -> Probe:
    return Probe(host, port, f"probe-{uuid.uuid4().hex[:8]}")


def test_password_file_must_exist_to_start(tmp_path: Path) -> None:
    path = tmp_path / "b.conf"
    path.write_text("listener 1883 127.0.0.1\npassword_file missing\n")
    with pytest.raises(RuntimeError, match="cannot read password file"):
        start_embedded(path, directory=tmp_path)


def test_will_on_a_topic_the_client_may_not_write_is_dropped(
        fabric_acl_broker: BrokerHandle) -> None:
    """mosquitto accepts the connection but never publishes a forbidden will; nor does the
    embedded broker (amqtt published wills without asking the ACL)."""
    broker = fabric_acl_broker
    with _connect(broker, "master", "master", "master-pw") as master:
        assert master.subscribe("fabric/nodes/+/status", 1) == [1]
        forger = RawClient(broker.host, broker.port, "n1", username="n1", password="n1-pw",
                           will=("fabric/nodes/n2/status", b"forged", 1, True))
        assert forger.connack_code == 0
        forger.close()
        honest = RawClient(broker.host, broker.port, "n1", username="n1", password="n1-pw",
                           will=("fabric/nodes/n1/status", b"dead", 1, True))
        honest.close()
        assert master.wait_message("fabric/nodes/n1/status") is not None
        assert master.received("fabric/nodes/n2/status") == []
        master.publish("fabric/nodes/n1/status", b"", qos=1, retain=True)
