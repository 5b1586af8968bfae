"""A board (MicroPython unix port, 100K heap, its own `ssl` module) on the fabric's TLS
listener: umqtt.simple's `ssl` with the broker's certificate verified against the CA the
deploy script puts on the board; a board given another CA never comes online. Both brokers."""

from __future__ import annotations

import ssl
import sys
from pathlib import Path
from typing import Iterator

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from core.protocol import TaskSpec  # noqa: E402
from esp32_support import (Harness, TlsFiles, boards, make_tls_files,  # noqa: E402,F401
                           micropython, root, tls_broker_config, umqtt_file)
from support.brokers import BrokerHandle, broker_params, start_broker  # noqa: E402

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls_files(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module", params=broker_params())
def tls_broker(request: pytest.FixtureRequest, tls_files: TlsFiles,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerHandle]:
    handle = start_broker(request.param, tls_broker_config(tls_files),
                          directory=tmp_path_factory.mktemp(request.param))
    assert handle.url.startswith("mqtts://")
    yield handle
    handle.stop()


def ca_der(path: Path) -> bytes:
    """The CA as the deploy script sends it: DER (smaller to hold than PEM)."""
    return ssl.PEM_cert_to_DER_cert(path.read_text())


def test_a_board_works_over_tls(tls_broker: BrokerHandle, tls_files: TlsFiles, root: str,
                                boards, record_property) -> None:
    board = boards(tls_broker, "tls-1", root, MQTT_CA_FILE="ca.der",
                   files={"ca.der": ca_der(tls_files.ca)})
    with Harness(tls_broker, root, tls_ca=tls_files.ca) as h:
        ready = h.wait_status("tls-1", "ready", 40)
        tasks = [TaskSpec(id=f"t{i}", name="primes", args=[[7, 8, 2**61 - 1, 2**64 - 59, 91]])
                 for i in range(6)]
        tasks.append(TaskSpec(id="sq", name="lambda", kwargs={"name": "square", "event": 9}))
        h.send("tls-1", tasks)
        got = h.wait_results([t.id for t in tasks], 40)
        assert all(got[f"t{i}"].value == [0, 2, 3] for i in range(6))
        assert got["sq"].value == 81
        state = h.snapshot("tls-1")
        assert state["errors"] == 0 and state["reconnects"] == 1
        board.kill()
        assert h.wait_status("tls-1", "dead", 20, after=ready.at).message.seq == 1
    record_property("tls_heap_peak_alloc", state["heap_peak"])
    record_property("tls_heap_min_free", state["heap_min_free"])
    print(f"{tls_broker.kind}: TLS board, 100K heap: peak mem_alloc {state['heap_peak']} B, "
          f"min mem_free {state['heap_min_free']} B")


@pytest.mark.parametrize("case", ["other CA", "other name"])
def test_a_board_refuses_a_broker_it_cannot_verify(tls_broker: BrokerHandle, tls_files: TlsFiles,
                                                   root: str, boards, case: str) -> None:
    """Signed by a CA the board was not given, or for a name it did not ask for."""
    ca = tls_files.other_ca if case == "other CA" else tls_files.ca
    extra = {"MQTT_TLS_HOSTNAME": "not-the-broker.example"} if case == "other name" else {}
    board = boards(tls_broker, "tls-rogue", root, MQTT_CA_FILE="ca.der",
                   files={"ca.der": ca_der(ca)}, **extra)
    with Harness(tls_broker, root, tls_ca=tls_files.ca) as h:
        def failures() -> int:
            return board.log().count("error:")
        h.wait(lambda: failures() >= 2, 40, "two refused handshakes")
        assert not h.status_of("tls-rogue")
        assert board.running()
