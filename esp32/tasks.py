"""The board's tasks: built-ins (noop, echo, sleep, primes) and the firmware lambdas.

run() turns one task into its wire result and never raises: a failure becomes an error
with a kind the master can act on (bad_request, unknown_task, unknown_lambda, memory,
exception). A task's context may hold `poll(ms)`: wait up to ms reading messages, True once
the task is cancelled (`sleep` waits with it and ends; a firmware lambda may too).
"""

import gc
import json
import time

try:
    from primality import is_prime
except ImportError:  # deployed without primality.py: `primes` answers unknown_task
    is_prime = None

try:
    from lambdas import LAMBDAS
except Exception as e:  # a broken lambdas.py must not keep the node offline
    print("tasks: lambdas not loaded:", repr(e))
    LAMBDAS = {}

BUILTIN = ("noop", "echo", "sleep", "primes", "lambda")
CACHE_LIMIT = 256  # a result whose value encodes to at most this is kept for resending
MAX_SLEEP_S = 3600
POLL_MS = 200  # longest wait between two looks at the messages while `sleep` runs


class TaskError(Exception):
    def __init__(self, kind, message, type_name="TaskError"):
        super().__init__(message)
        self.kind = kind
        self.type_name = type_name


def error(kind, type_name, message):
    return {"kind": kind, "type": type_name, "message": str(message)[:200]}


def names():
    """The task names this board runs, for its status (a lambda also runs by its name)."""
    out = list(BUILTIN)
    for name in LAMBDAS:
        if name not in out:
            out.append(name)
    return ",".join(out)


def lambda_names():
    """The firmware lambdas, for its status: where the master sends `lambda` tasks."""
    return ",".join(LAMBDAS)


def primes(numbers):
    """Indices of the primes in `numbers` (ints, or decimal strings for big ones)."""
    if is_prime is None:
        raise TaskError("unknown_task", "primality.py is not installed")
    if type(numbers) is not list:
        raise TaskError("bad_request", "primes takes a list of numbers", "TypeError")
    found = []
    for i in range(len(numbers)):
        n = numbers[i]
        if type(n) is str:
            digits = n[1:] if n[:1] == "-" else n
            if not digits.isdigit():
                raise TaskError("bad_request", "item %d is not a decimal number" % i,
                                "ValueError")
            n = int(n)
        elif type(n) is not int:
            raise TaskError("bad_request", "item %d is not an int" % i, "TypeError")
        if is_prime(n):
            found.append(i)
    return found


def _call(name, args, kwargs, context):
    if name == "noop":
        return None
    if name == "echo":
        return args[0] if args else None
    if name == "sleep":
        s = args[0] if args else 0
        if type(s) not in (int, float) or not 0 <= s <= MAX_SLEEP_S:
            raise TaskError("bad_request", "sleep takes 0-%d seconds" % MAX_SLEEP_S)
        poll = context.get("poll")
        if poll is None:
            time.sleep(s)
            return s
        end = time.ticks_add(time.ticks_ms(), int(s * 1000))
        left = int(s * 1000)
        # reading messages meanwhile: a cancel ends it early (its result says `cancelled`)
        while left > 0 and not poll(min(left, POLL_MS)):
            left = time.ticks_diff(end, time.ticks_ms())
        return s
    if name == "primes":
        if not args:
            raise TaskError("bad_request", "primes takes a list of numbers")
        return primes(args[0])
    if name == "lambda":
        fn = LAMBDAS.get(kwargs.get("name"))
        event = kwargs.get("event")
        if fn is None:
            raise TaskError("unknown_lambda", "no lambda %r here" % kwargs.get("name"))
    elif name in LAMBDAS:
        fn = LAMBDAS[name]
        event = kwargs.get("event", args[0] if args else None)
    else:
        raise TaskError("unknown_task", "no task %r here" % name)
    return fn(event, context)


def run(task, context):
    """(result, cacheable): the wire result of one task, and whether it is small to keep."""
    tid = task["id"]
    try:
        value = _call(task["name"], task.get("args", []), task.get("kwargs", {}), context)
        # Also proves JSON can carry the value before it is queued for sending.
        small = len(json.dumps(value)) <= CACHE_LIMIT
        return {"id": tid, "ok": True, "value": value}, small
    except TaskError as e:
        err = error(e.kind, e.type_name, e)
    except MemoryError:
        value = None
        gc.collect()
        err = error("memory", "MemoryError", "heap exhausted")
    except Exception as e:
        err = error("exception", type(e).__name__, e)
    return {"id": tid, "ok": False, "error": err}, True
