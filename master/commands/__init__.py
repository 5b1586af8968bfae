"""The `master-node` commands, one module each: NAME, HELP, DESCRIPTION, add_arguments, run."""

from master.commands import (broker, dashboard, nodes, passwd, pipelines, primes, serve, snapshot,
                             status, submit)

COMMANDS = [serve, submit, nodes, status, primes, snapshot, pipelines, dashboard, passwd, broker]

__all__ = ["COMMANDS"]
