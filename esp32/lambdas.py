"""Functions this board runs by name: a task named `lambda` with kwargs {"name", "event"}
(or a task named after the function, with the event in kwargs["event"] or args[0]).

Each takes (event, context) and returns a value JSON can carry. `context` holds node_id,
task_id, instance and poll: a lambda that waits calls poll(ms) (wait up to ms reading
messages; True once the task is cancelled). Keep them small: they run on the node's only
thread of work.
"""

import gc


def square(event, context):
    """event: a number."""
    return event * event


def total(event, context):
    """event: a list of numbers."""
    s = 0
    for x in event:
        s += x
    return s


def word_count(event, context):
    """event: a string; the number of words per distinct word."""
    counts = {}
    for w in event.split():
        counts[w] = counts.get(w, 0) + 1
    return counts


def heap(event, context):
    """The board's heap after a collection: free and allocated bytes."""
    gc.collect()
    return {"free": gc.mem_free(), "alloc": gc.mem_alloc()}


LAMBDAS = {
    "square": square,
    "sum": total,
    "word_count": word_count,
    "heap": heap,
}
