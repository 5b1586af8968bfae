"""Whose work the board takes: the current lease holder's, never a deposed master's.

Replicated masters stamp every task batch with their lease (epoch, master id) and keep the
lease retained on `<root>/master/lease`. The fence remembers the best lease seen held
(epoch, then holder id, as the masters order them) and admits a batch only if it carries
exactly that lease; only the lease topic moves it. Epoch 0 is a master of its own (no
replication): taken unless a lease is held. The same rules as the CPython node's.
"""

import json


class LeaseFence:
    def __init__(self):
        self.best = (0, "")  # (epoch, holder) of the best lease seen held
        self.held = False    # ... and it was last seen held, not expired

    def observe(self, msg):
        """A message on the lease topic; a cleared, malformed or `claim` one changes nothing."""
        try:
            m = json.loads(msg)
        except Exception:
            return
        if type(m) is not dict or m.get("type") != "lease":
            return
        epoch = m.get("epoch")
        holder = m.get("holder")
        if type(epoch) is not int or epoch < 1 or type(holder) is not str or not holder:
            return
        if (epoch, holder) >= self.best:
            state = m.get("state")
            if state == "held":
                self.best = (epoch, holder)
                self.held = True
            elif state == "expired":  # its holder is gone; an older lease is still refused
                self.held = False

    def admits(self, epoch, master):
        """Take a batch from `master` at `epoch`?"""
        if epoch == 0:
            return not self.held
        return self.held and (epoch, master) == self.best

    def admits_control(self, epoch):
        """Control messages carry an epoch only: none older than the lease."""
        return not self.held if epoch == 0 else epoch >= self.best[0]
