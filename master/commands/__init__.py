"""The `master-node` commands, one module each: NAME, HELP, DESCRIPTION, add_arguments, run."""

from master.commands import nodes, serve, status, submit

COMMANDS = [serve, submit, nodes, status]

__all__ = ["COMMANDS"]
