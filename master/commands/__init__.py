"""The `master-node` commands, one module each: NAME, HELP, DESCRIPTION, add_arguments, run."""

from master.commands import (broker, cancel, dashboard, nodes, passwd, pipelines, primes, result,
                             serve, snapshot, status, submit, task, tasks)

COMMANDS = [serve, submit, result, tasks, task, cancel, nodes, status, primes, snapshot, pipelines,
            dashboard, passwd, broker]

__all__ = ["COMMANDS"]
