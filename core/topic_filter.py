"""MQTT topic filters: does a topic match a filter, by MQTT 3.1.1's rules (4.7).

`+` is exactly one level (an empty one too), `#` any number of levels at the end, the parent
level included (`a/#` matches `a`), and a topic starting with `$` is not matched by a filter
whose first level is a wildcard. The one matcher of the fabric's sessions and of the
embedded broker's ACL; the broker's subscription index (`broker.index`) applies the same
rules to many filters at once.
"""

from __future__ import annotations

__all__ = ["topic_matches"]


def topic_matches(topic_filter: str, topic: str) -> bool:
    """True if `topic` matches `topic_filter`."""
    if topic_filter == topic:
        return True
    if topic[:1] == "$" and topic_filter[:1] in ("+", "#"):
        return False
    filter_levels = topic_filter.split("/")
    topic_levels = topic.split("/")
    for index, level in enumerate(filter_levels):
        if level == "#":
            return index == len(filter_levels) - 1
        if index >= len(topic_levels):
            return False
        if level != "+" and level != topic_levels[index]:
            return False
    return len(filter_levels) == len(topic_levels)
