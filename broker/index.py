"""`FilterIndex`: the subscription filters matching a topic, found without scanning them all.

amqtt compares every publish with every filter in turn, so its cost grows with the number of
clients: a thousand nodes, each subscribed to its own task topic, make every heartbeat and
every result a thousand comparisons. Here filters without wildcards are a set (one lookup)
and wildcard filters a tree of topic levels, walked once per publish along the topic's
levels, so a match costs what the topic's depth costs whatever the number of filters.

The rules are MQTT 3.1.1's (4.7): `+` is exactly one level (an empty one too), `#` is any
number of levels at the end, the parent level included (`a/#` matches `a`), and a topic that
starts with `$` is never matched by a filter whose first level is a wildcard.
"""

from __future__ import annotations

from typing import Iterable, Iterator

__all__ = ["FilterIndex", "has_wildcard"]


def has_wildcard(topic_filter: str) -> bool:
    return "+" in topic_filter or "#" in topic_filter


def _valid(levels: list[str]) -> bool:
    """Wildcards only as whole levels, `#` only last (MQTT-4.7.1-2, -3): amqtt refuses other
    filters at SUBSCRIBE, and one that gets in anyway matches nothing, as in amqtt."""
    last = len(levels) - 1
    return all(("+" not in level or level == "+") and
               ("#" not in level or (level == "#" and index == last))
               for index, level in enumerate(levels))


class _Level:
    """One level of the wildcard tree: its literal children, its `+` child, the filters that
    end here and those that end here with `/#`."""

    __slots__ = ("children", "plus", "ending", "hashes")

    def __init__(self) -> None:
        self.children: dict[str, _Level] = {}
        self.plus: _Level | None = None
        self.ending: list[str] = []  # filters whose last level is this one
        self.hashes: list[str] = []  # filters `<this level>/#` (at the root: `#`)

    def empty(self) -> bool:
        return not (self.children or self.plus or self.ending or self.hashes)


class FilterIndex:
    """A set of topic filters that answers `match(topic)`; each filter is held once."""

    def __init__(self, filters: Iterable[str] = ()) -> None:
        self._exact: set[str] = set()
        self._inert: set[str] = set()  # malformed wildcard filters: held, never matched
        self._root = _Level()
        self._wildcards = 0
        for topic_filter in filters:
            self.add(topic_filter)

    def __len__(self) -> int:
        return len(self._exact) + len(self._inert) + self._wildcards

    def __contains__(self, topic_filter: object) -> bool:
        if not isinstance(topic_filter, str):
            return False
        if not has_wildcard(topic_filter):
            return topic_filter in self._exact
        if topic_filter in self._inert:
            return True
        return _valid(topic_filter.split("/")) and \
            topic_filter in self._holder(topic_filter, create=False)

    def __iter__(self) -> Iterator[str]:
        yield from self._exact
        yield from self._inert
        stack = [self._root]
        while stack:
            level = stack.pop()
            yield from level.ending
            yield from level.hashes
            stack.extend(level.children.values())
            if level.plus is not None:
                stack.append(level.plus)

    def add(self, topic_filter: str) -> None:
        if not has_wildcard(topic_filter):
            self._exact.add(topic_filter)
            return
        if not _valid(topic_filter.split("/")):
            self._inert.add(topic_filter)
            return
        holder = self._holder(topic_filter, create=True)
        if topic_filter not in holder:
            holder.append(topic_filter)
            self._wildcards += 1

    def discard(self, topic_filter: str) -> None:
        if not has_wildcard(topic_filter):
            self._exact.discard(topic_filter)
            return
        if topic_filter in self._inert:
            self._inert.discard(topic_filter)
            return
        levels = topic_filter.split("/")
        hashed = levels[-1] == "#"
        if hashed:
            levels.pop()
        path = [self._root]
        for level in levels:
            nxt = path[-1].plus if level == "+" else path[-1].children.get(level)
            if nxt is None:
                return
            path.append(nxt)
        holder = path[-1].hashes if hashed else path[-1].ending
        if topic_filter not in holder:
            return
        holder.remove(topic_filter)
        self._wildcards -= 1
        for depth in range(len(levels), 0, -1):  # prune the levels left empty
            node, parent, level = path[depth], path[depth - 1], levels[depth - 1]
            if not node.empty():
                break
            if level == "+":
                parent.plus = None
            else:
                del parent.children[level]

    def clear(self) -> None:
        self._exact.clear()
        self._inert.clear()
        self._root = _Level()
        self._wildcards = 0

    def match(self, topic: str) -> list[str]:
        """Every filter that matches `topic`, each once (exact ones first)."""
        found = [topic] if topic in self._exact else []
        root = self._root
        if root.empty():
            return found
        levels = topic.split("/")
        if topic.startswith("$"):  # MQTT-4.7.2-1: no wildcard at the first level matches
            child = root.children.get(levels[0])
            current = [child] if child is not None else []
            levels = levels[1:]
        else:
            current = [root]
        for level in levels:
            following: list[_Level] = []
            for node in current:
                if node.hashes:
                    found.extend(node.hashes)
                child = node.children.get(level)
                if child is not None:
                    following.append(child)
                if node.plus is not None:
                    following.append(node.plus)
            current = following
            if not current:
                return found
        for node in current:
            found.extend(node.ending)
            found.extend(node.hashes)  # `a/#` matches `a` itself
        return found

    def _holder(self, topic_filter: str, *, create: bool) -> list[str]:
        levels = topic_filter.split("/")
        hashed = levels[-1] == "#"
        if hashed:
            levels.pop()
        node = self._root
        for level in levels:
            if level == "+":
                if node.plus is None:
                    if not create:
                        return []
                    node.plus = _Level()
                node = node.plus
            else:
                child = node.children.get(level)
                if child is None:
                    if not create:
                        return []
                    child = node.children[level] = _Level()
                node = child
        return node.hashes if hashed else node.ending
