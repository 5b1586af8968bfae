"""`master-node snapshot`: ask the running master for a snapshot now; print where it went."""

from __future__ import annotations

import argparse
import json
import time

from core.errors import FabricError, FabricTimeout
from master.commands.common import add_client_options, connect

NAME = "snapshot"
HELP = "take a snapshot of the master and its nodes now"
DESCRIPTION = ("Ask the running master for a snapshot: its queue, work in flight by node, "
               "counters and nodes, plus each live node's own report, written by the master as "
               "snapshot_<n>_<time>.json in its snapshot directory (master-node serve "
               "--snapshots). Prints the file's path once it is written (on the master's "
               "machine). Exit 0 when written, 2 when no master answers or it could not write.")

_POLL = 0.1


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true",
                   help="print {snapshot, path, nodes_expected, nodes_reported} as JSON")
    p.add_argument("--no-wait", action="store_true",
                   help="print the path as soon as the master accepts the request, without "
                        "waiting for the nodes' reports to be collected")
    add_client_options(p)


def run(args: argparse.Namespace) -> int:
    client = connect(args)
    try:
        started = client.query("snapshot", timeout=args.timeout)
        info = {"snapshot": started["snapshot"], "path": started["path"], "written": False,
                "nodes_expected": started.get("nodes_expected", 0), "nodes_reported": 0}
        if not args.no_wait:
            # the master collects node reports for a bounded time, then writes the file
            deadline = time.monotonic() + float(started.get("collect_s", 2.0)) + args.timeout
            while True:
                info = client.query("snapshot_status", {"snapshot": started["snapshot"]},
                                    timeout=args.timeout)
                if info.get("written") or info.get("error"):
                    break
                if time.monotonic() > deadline:
                    raise FabricTimeout(f"snapshot {started['snapshot']} was not written in time")
                time.sleep(_POLL)
            if info.get("error"):
                raise FabricError(f"the master could not write the snapshot: {info['error']}")
    finally:
        client.close()
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(info["path"])
    return 0
