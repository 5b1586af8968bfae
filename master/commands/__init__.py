"""The `master-node` commands, one module each: NAME, HELP, DESCRIPTION, add_arguments, run."""

from master.commands import nodes, serve, status, submit
from master.commands import pipelines
from master.commands import primes
from master.commands import snapshot

COMMANDS = [serve, submit, nodes, status, pipelines, primes, snapshot]

__all__ = ["COMMANDS"]
