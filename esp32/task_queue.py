"""The board's task intake: decode, validate, drop duplicates, keep priority order, bounded.

The order is the fabric's (core.priority_queue, which the board cannot import): the highest
priority first, arrival order within a priority; the least urgent is the lowest priority, the
newest among equals. tests/priority_cases.py holds the cases both pass.

Messages come from the master's task topic as JSON. A task whose id is known but whose
fields are wrong is answered with a `bad_request` error; anything else that is not a valid
message is counted in `rejected`. Past `size` tasks, or past `max_bytes` of held task
payload (a decoded task takes a few times its JSON size in heap), the least urgent task is
handed back (`released`) so the master can give it to another node; so are the tasks of
a batch the heap cannot decode, their ids read from the raw JSON, and those a `release`
control asks for.

A `cancel` control ({"ids": [...]}) drops a queued task, answered `cancelled` (it never
starts), and flags the running one: a board task cannot be interrupted, so its result is
replaced by `cancelled` when it ends (`sleep` ends early: it reads messages while it waits).

Each dispatch carries an `attempt` and a `token` that its result echoes. Results are
remembered by (id, attempt): the same attempt again is answered from memory, a newer one
runs again (or, while the task is still held, replaces the held copy's attempt and token).

Replicated masters: a batch the lease fence (lease.py) refuses is handed back, so its
legitimate sender dispatches it again.
"""

import gc
import json
import time

from lease import LeaseFence
from tasks import error

MIN_PRIORITY = 1
MAX_PRIORITY = 10
DEFAULT_PRIORITY = 5
MAX_ID = 128   # longest task id, as on the master
RECENT = 16    # completed (id, attempt) pairs remembered to drop duplicates
# the error of a cancelled task, as a CPython node says it
CANCELLED = {"kind": "cancelled", "type": "Cancelled", "message": "cancelled"}

# MicroPython ports other than unix count time from 2000-01-01; the wire wants unix time.
EPOCH = 946684800 if time.gmtime(0)[0] == 2000 else 0


def now():
    """Unix time in seconds (a float where the port has one)."""
    return time.time() + EPOCH


class TaskQueue:
    """Tasks held by the board, their results waiting to be sent, and the counters."""

    def __init__(self, size=8, max_bytes=8192):
        self.size = size
        self.max_bytes = max_bytes  # held tasks' share of their messages: bounds the heap
        self.items = []       # (priority, seq, task, size), in arrival order
        self.seq = 0
        self.fence = LeaseFence()
        self.running = None   # id of the task being run
        self.run_task = None  # ... and the task itself (a newer attempt updates it)
        self.cancelled = None  # id of the running task the master cancelled
        self.recent = []      # [id, attempt, result or None], newest last
        self.outbox = []      # results not yet acknowledged by the broker
        self.outbox_since = 0
        self.released = []    # ids handed back unstarted
        self.snapshots = []   # request ids of snapshot requests to answer
        self.tasks_done = 0
        self.tasks_failed = 0
        self.rejected = 0
        self.duplicates = 0

    def handle(self, msg, buf=None):
        """Take one message from the task topic (bytes, or a view of the start of `buf`)."""
        try:
            m = json.loads(msg)
        except ValueError:
            self.rejected += 1
            return
        except MemoryError:
            m = None
            gc.collect()
            self.rejected += 1
            if buf is not None:
                self.hand_back_unread(buf, len(msg))
            return
        if type(m) is not dict:
            self.rejected += 1
            return
        v = m.get("v")
        kind = m.get("type")
        if type(v) is not int or v != 1:
            self.rejected += 1
        elif kind == "tasks" and type(m.get("tasks")) is list:
            epoch = m.get("epoch", 0)
            if type(epoch) is not int or not self.fence.admits(epoch, m.get("master", "")):
                self.rejected += 1  # not the lease holder's: handed back
                for t in m["tasks"]:
                    tid = t.get("id") if type(t) is dict else None
                    if (type(tid) is str and tid != self.running and self.find(tid) < 0
                            and tid not in self.released):
                        self.released.append(tid)
                return
            share = len(msg) // (len(m["tasks"]) or 1)
            for t in m["tasks"]:
                self.accept(t, share)
        elif kind == "control":
            self.control(m)
        else:
            self.rejected += 1

    def control(self, m):
        epoch = m.get("epoch", 0)
        command = m.get("command")
        params = m.get("params", {})
        if type(epoch) is not int or not self.fence.admits_control(epoch):
            self.rejected += 1
        elif command == "snapshot":
            self.snapshots.append(str(m.get("request_id", "")))
        elif command == "release" and type(params) is dict \
                and type(params.get("count")) is int and params["count"] > 0:
            self.release(params["count"])
        elif command == "cancel" and type(params) is dict and type(params.get("ids")) is list:
            self.cancel(params["ids"])
        else:
            self.rejected += 1

    def cancel(self, ids):
        """Drop the queued tasks among `ids`, answered `cancelled`; flag the running one.
        Other ids are done already (the master drops a result it cancelled)."""
        for tid in ids:
            if type(tid) is not str:
                self.rejected += 1
            elif tid == self.running:
                self.cancelled = tid
            else:
                i = self.find(tid)
                if i >= 0:
                    self.finish({"id": tid, "ok": False, "error": CANCELLED}, True,
                                self.items.pop(i)[2])

    def accept(self, t, size=0):
        """Queue one task of a batch; `size` is its share of the message, in bytes."""
        if type(t) is not dict:
            self.rejected += 1
            return
        tid = t.get("id")
        if type(tid) is not str or not 0 < len(tid) <= MAX_ID:
            self.rejected += 1
            return
        a = t.get("attempt", 0)
        tok = t.get("token", "")
        if type(a) is not int or a < 0 or type(tok) is not str or len(tok) > 64:
            self.finish({"id": tid, "ok": False, "error": error(
                "bad_request", "TypeError", "attempt must be an int >= 0, token a string")})
            return
        if self.known(tid, a, tok):
            return
        p = t.get("priority", DEFAULT_PRIORITY)
        if (type(t.get("name")) is not str or type(t.get("args", [])) is not list
                or type(t.get("kwargs", {})) is not dict or type(p) is not int
                or not MIN_PRIORITY <= p <= MAX_PRIORITY):
            self.finish({"id": tid, "ok": False, "error": error(
                "bad_request", "TypeError",
                "name must be a string, args a list, kwargs a map, priority 1-10")}, True, t)
            return
        q = self.items
        # Over the count or the byte budget (one task always fits): hand back the least
        # urgent (the newest among equals), which may be this one.
        while q and (len(q) >= self.size or self.held_bytes() + size > self.max_bytes):
            low = self._least()
            if q[low][0] >= p:
                self.released.append(tid)
                return
            self.released.append(q.pop(low)[2]["id"])
        self.seq += 1
        q.append((p, self.seq, t, size))

    def known(self, tid, a, tok):
        """True if attempt `a` of task `tid` needs no run: it is held (a newer attempt takes
        over the held copy's attempt and token), or done (the same attempt is answered from
        memory, an older one dropped)."""
        i = self.find(tid)
        held = self.run_task if tid == self.running else self.items[i][2] if i >= 0 else None
        if held is not None:
            if a > held.get("attempt", 0):  # re-dispatched: answer the newest attempt
                held["attempt"] = a
                held["token"] = tok
            else:
                self.duplicates += 1
            return True
        for entry in self.recent:
            if entry[0] == tid and entry[1] >= a:
                self.duplicates += 1
                if entry[1] == a and entry[2] is not None:
                    self.send(entry[2])
                return True
        return False

    def _least(self):
        """Index of the least urgent held task (the newest among equals)."""
        q = self.items
        low = 0
        for i in range(1, len(q)):
            if q[i][0] <= q[low][0]:
                low = i
        return low

    def release(self, n):
        """Hand back up to n unstarted tasks, least urgent first (the master's `release`)."""
        while n > 0 and self.items:
            self.released.append(self.items.pop(self._least())[2]["id"])
            n -= 1

    def hand_back_unread(self, buf, n):
        """A batch too big for the heap left: hand back the task ids its raw JSON names.

        Without this its tasks would be lost until the master gave up on them. Only
        `"id": "..."` pairs are read (at most 32); an id the master does not have in flight
        on this node is ignored by it.
        """
        pos = 0
        for _ in range(32):
            pos = buf.find(b'"id"', pos, n)
            if pos < 0:
                return
            pos += 4
            while pos < n and buf[pos] in (32, 9, 10, 13, 58):  # spaces and the colon
                pos += 1
            if pos >= n or buf[pos] != 34:
                continue
            end = buf.find(b'"', pos + 1, min(n, pos + 2 + MAX_ID))
            if end <= pos + 1:
                continue
            tid = str(buf[pos + 1:end], "utf-8")
            pos = end
            if "\\" not in tid and tid not in self.released and tid != self.running \
                    and self.find(tid) < 0:
                self.released.append(tid)

    def held_bytes(self):
        n = 0
        for item in self.items:
            n += item[3]
        return n

    def find(self, tid):
        for i in range(len(self.items)):
            if self.items[i][2]["id"] == tid:
                return i
        return -1

    def _best(self):
        q = self.items
        best = 0
        for i in range(1, len(q)):
            if q[i][0] > q[best][0]:
                best = i
        return best

    def peek(self):
        """The task get() would return next, left in the queue; or None."""
        return self.items[self._best()][2] if self.items else None

    def get(self):
        """The most urgent task (FIFO within a priority), now marked running; or None."""
        if not self.items:
            return None
        task = self.items.pop(self._best())[2]
        self.running = task["id"]
        self.run_task = task
        return task

    def finish(self, result, cache=True, task=None):
        """Record a task's result, with the attempt and token of its (newest) dispatch, and
        queue it for sending."""
        if result["id"] == self.running:
            self.running = self.run_task = None
            if self.cancelled == result["id"]:  # its late result is replaced
                self.cancelled = None
                result = {"id": result["id"], "ok": False, "error": CANCELLED}
        d = task or {}
        result["attempt"] = d.get("attempt", 0)
        result["token"] = d.get("token", "")
        result["ts"] = now()
        if result["ok"]:
            self.tasks_done += 1
        elif result["error"] is not CANCELLED:  # a cancelled one counts in neither
            self.tasks_failed += 1
        self.recent.append([result["id"], result["attempt"], result if cache else None])
        if len(self.recent) > RECENT:
            self.recent.pop(0)
        self.send(result)

    def send(self, result):
        if not self.outbox:
            self.outbox_since = time.ticks_ms()
        self.outbox.append(result)

    def release_all(self):
        """Hand back every task without a result (clean shutdown, also one interrupted)."""
        if self.running is not None:
            self.released.append(self.running)
            self.running = self.run_task = None
        self.released.extend(item[2]["id"] for item in self.items)
        self.items = []

    def held(self):
        ids = [item[2]["id"] for item in self.items]
        if self.running is not None:
            ids.insert(0, self.running)
        return ids

    def workload(self):
        return len(self.items) + (1 if self.running is not None else 0)

    def full(self):
        return len(self.items) >= self.size or self.held_bytes() >= self.max_bytes

