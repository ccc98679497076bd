# Copyright (c) align-detr contributors.
"""Invertible state-dict renaming from ``{placeholder}`` templates.

A rule ``("neck.convs.{i}.conv.{p}", "neck.lateral.{i}.0.{p}")`` maps in both directions;
``{i}`` matches one index (digits) and any other placeholder one dotted tail (``weight``,
``layers.0.bias``, ...). The first rule that matches a key wins.
"""

import re
from typing import Dict, List, Optional, Sequence, Tuple

__all__ = ["RenameRules"]

_PLACEHOLDER = re.compile(r"\{(\w+)\}")


def _compile(template: str) -> "re.Pattern":
    parts, last = [], 0
    for m in _PLACEHOLDER.finditer(template):
        parts.append(re.escape(template[last : m.start()]))
        name = m.group(1)
        parts.append(rf"(?P<{name}>\d+)" if name == "i" else rf"(?P<{name}>.+)")
        last = m.end()
    parts.append(re.escape(template[last:]))
    return re.compile("^" + "".join(parts) + "$")


class RenameRules:
    """An ordered list of ``(their_template, our_template)`` pairs.

    Args:
        rules: the pairs; the placeholder ``{i}`` matches digits, any other a dotted tail.
    """

    def __init__(self, rules: Sequence[Tuple[str, str]]):
        self.rules = list(rules)
        self._theirs = [(_compile(a), b) for a, b in self.rules]
        self._ours = [(_compile(b), a) for a, b in self.rules]

    @staticmethod
    def _apply(compiled, key: str) -> Optional[str]:
        for pattern, target in compiled:
            m = pattern.match(key)
            if m:
                return target.format(**m.groupdict())
        return None

    def to_ours(self, key: str) -> Optional[str]:
        """Our name of one of their keys, or None when no rule matches."""
        return self._apply(self._theirs, key)

    def to_theirs(self, key: str) -> Optional[str]:
        """Their name of one of our keys, or None when no rule matches."""
        return self._apply(self._ours, key)

    def rename(self, state: Dict, to_ours: bool = True) -> Tuple[Dict, List[str]]:
        """Renames every key; returns (renamed dict, keys no rule matched, left out)."""
        out, unmatched = {}, []
        for key, value in state.items():
            new = self.to_ours(key) if to_ours else self.to_theirs(key)
            if new is None:
                unmatched.append(key)
            else:
                out[new] = value
        return out, unmatched
