"""The prime job: files of numbers in, `primes.txt` out, through the fabric's nodes.

`master-node primes FILE...` runs it; `run_primes_job(client, PrimesJobOptions(...))` is the
same from Python.
"""

from master.primes_job.checkpoint import Checkpoint
from master.primes_job.numbers import BadLine, parse_line, read_numbers, wire_number
from master.primes_job.output import write_primes
from master.primes_job.plan import (DEFAULT_SHARD_SIZE, Shard, ShardPlan, iter_shards, job_id_for,
                                    plan_shards, task_digest, task_id, window_for)
from master.primes_job.progress import JobProgress, ProgressBar, render_progress
from master.primes_job.runner import (JobSummary, PrimesJob, PrimesJobOptions, check_files,
                                      run_primes_job)

__all__ = [
    "Checkpoint",
    "BadLine", "parse_line", "read_numbers", "wire_number",
    "write_primes",
    "DEFAULT_SHARD_SIZE", "Shard", "ShardPlan", "iter_shards", "job_id_for", "plan_shards",
    "task_digest", "task_id", "window_for",
    "JobProgress", "ProgressBar", "render_progress",
    "JobSummary", "PrimesJob", "PrimesJobOptions", "check_files", "run_primes_job",
]
