"""`master-node primes FILE...`: find the primes among the numbers in files, on the fabric."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from master.commands.common import add_client_options, connect

if TYPE_CHECKING:
    from master.primes_job import BadLine, JobSummary

NAME = "primes"
HELP = "find the primes in files of numbers, on the compute nodes"
DESCRIPTION = (
    "Read FILEs (one integer a line; blank lines skipped; bad lines reported on stderr as "
    "file:line and counted), cut them into shards, test every number on the compute nodes "
    "(Miller-Rabin, deterministic below 3.3e24; BPSW above) and write the unique primes, ascending, one "
    "a line, to --output (replaced atomically; rewritten every few seconds while the job runs). "
    "Files larger than memory are fine: a bounded window of shards is in flight. Finished shards "
    "are checkpointed beside the output: if this command, the master or a node dies, run the "
    "same command again and it resumes. Shards the master finished for an earlier run of the "
    "same files, with the very same numbers, are reused; the summary tells them from shards run "
    "now. Progress goes to stderr and, retained, to <root>/jobs/<job id>/progress (its state "
    "ends as done, incomplete, failed, cancelled or interrupted); a summary to stdout. Exit 0 "
    "when every number was tested, 1 when some shards failed or were cancelled (run again to "
    "retry them), 2 on a usage or "
    "connection error, 130/143 when interrupted by SIGINT/SIGTERM (run again to resume).")

_MAX_BAD_SHOWN = 100


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("files", nargs="+", type=Path, metavar="FILE", help="input files")
    p.add_argument("--output", "-o", type=Path, default=Path("primes.txt"), metavar="FILE",
                   help="where the primes go (default %(default)s)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--shard-size", type=int, metavar="N",
                   help="numbers per task (default: fits the smallest payload a live node "
                        "takes, at most 4096)")
    p.add_argument("--job-id", metavar="ID",
                   help="job id (default: from the files' paths, sizes and modification times, "
                        "so the same command over the same files resumes the same job)")
    p.add_argument("--checkpoint", type=Path, metavar="FILE",
                   help="checkpoint file (default: <output>.checkpoint); removed after a "
                        "complete run unless --keep-checkpoint")
    p.add_argument("--keep-checkpoint", action="store_true",
                   help="keep the checkpoint after a complete run")
    p.add_argument("--priority", type=int, default=5, metavar="1-10",
                   help="priority of the job's tasks (default %(default)s)")
    p.add_argument("--retries", type=int, default=2, metavar="N",
                   help="new attempts of a shard that failed, in this run (default %(default)s)")
    p.add_argument("--stall-timeout", type=float, default=300.0, metavar="SECONDS",
                   help="give up (resumably) when no shard finishes for this long "
                        "(default %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    add_client_options(p)


def run(args: argparse.Namespace) -> int:
    from master.primes_job import PrimesJobOptions, ProgressBar, check_files, run_primes_job

    check_files(args.files)  # a clear error before connecting to anything
    options = PrimesJobOptions(
        files=tuple(args.files), output=args.output, checkpoint=args.checkpoint,
        job_id=args.job_id, shard_size=args.shard_size, priority=args.priority,
        timeout=args.timeout, stall_timeout=args.stall_timeout, retries=args.retries,
        keep_checkpoint=args.keep_checkpoint)
    bar = ProgressBar(sys.stderr, enabled=not args.no_progress)
    shown = 0

    def bad_line(bad: BadLine) -> None:
        nonlocal shown
        shown += 1
        if shown <= _MAX_BAD_SHOWN:
            bar.message(f"master-node primes: bad line {bad}")
        elif shown == _MAX_BAD_SHOWN + 1:
            bar.message("master-node primes: more bad lines: counted, not shown")

    caught: list[int] = []

    def interrupt(signum: int, _frame: FrameType | None) -> None:
        caught.append(signum)
        raise KeyboardInterrupt

    client = connect(args)
    # both signals stop the job the same way: SIGTERM is what stop_system.sh sends, and SIGINT
    # is handled even when started from a shell that ignores it (a background job)
    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        summary = run_primes_job(client, options, on_bad_line=bad_line, on_progress=bar.update,
                                 on_notice=lambda text: bar.message(f"master-node primes: {text}"))
    except KeyboardInterrupt:
        signum = caught[0] if caught else signal.SIGINT
        bar.message(f"master-node primes: interrupted by {signal.Signals(signum).name}: finished "
                    "shards are checkpointed; run the same command again to resume")
        return 128 + signum
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        bar.close()
        client.close()
    if args.json:
        print(json.dumps(summary.to_dict(), indent=2))
    else:
        print(format_summary(summary))
    return 0 if summary.complete else 1


def format_summary(s: JobSummary) -> str:
    """The summary a person reads at the end of a job."""
    nodes = ", ".join(f"{node or '?'} ({count} shard{'s' if count != 1 else ''})"
                      for node, count in s.nodes.items()) or "none"
    lines = [
        f"job {s.job_id}: {'complete' if s.complete else 'INCOMPLETE'}",
        f"  numbers read     {s.numbers_read:,} from {len(s.files)} file(s)",
        f"  bad lines        {s.bad_lines:,}",
        f"  numbers tested   {s.numbers_tested:,}",
        f"  primes found     {s.primes:,} unique, in {s.output}",
        f"  shards           {s.shards:,} of up to {s.plan.get('shard_size', 0):,} numbers:"
        f" {s.shards_run:,} run now, {s.shards_from_checkpoint:,} from the checkpoint,"
        f" {s.shards_from_master:,} from the master's earlier results"
        f" ({s.retries} retried, {s.shards_failed} failed)",
        f"  time             {s.seconds:.2f} s ({s.rate:,.0f} numbers/s)",
        f"  nodes this run   {len(s.nodes)}: {nodes}",
    ]
    if not s.complete:
        lines.append("  some shards failed: run the same command again to retry them")
    return "\n".join(lines)
