"""Lambdas: functions registered by name, run on a compute node in worker processes under a
memory limit and a timeout, with `lambda_handler(event, context)` as their shape."""

from node.lambdas.context import LambdaContext
from node.lambdas.errors import LambdaError
from node.lambdas.outcome import ERROR_KINDS, ErrorKind, LambdaOutcome
from node.lambdas.registry import LambdaRegistry, default_registry, lambda_function, load_lambda
from node.lambdas.request import LambdaLimits
from node.lambdas.runner import LambdaRunner

__all__ = [
    "ERROR_KINDS",
    "ErrorKind",
    "LambdaContext",
    "LambdaError",
    "LambdaLimits",
    "LambdaOutcome",
    "LambdaRegistry",
    "LambdaRunner",
    "default_registry",
    "lambda_function",
    "load_lambda",
]
