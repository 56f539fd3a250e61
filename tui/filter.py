"""The `f` filter: narrow the tables to one node or one layer.

    ""            everything
    "L3", "layer 3", "layer=3"   rows touching layer 3
    anything else rows on nodes whose name contains it (case-insensitive)
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

_LAYER = re.compile(r"^\s*(?:l|layer)\s*[=:]?\s*(\d+)\s*$", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class Filter:
    node: str = ""
    layer: int | None = None

    @classmethod
    def parse(cls, query: str) -> Filter:
        match = _LAYER.match(query)
        if match:
            return cls(layer=int(match.group(1)))
        return cls(node=query.strip().lower())

    @property
    def active(self) -> bool:
        return bool(self.node) or self.layer is not None

    def describe(self) -> str:
        if self.layer is not None:
            return f"layer {self.layer}"
        return f"node ~ {self.node!r}" if self.node else ""

    def node_ok(self, name: Any) -> bool:
        """Rows on a node: only a node filter narrows them."""
        if not self.node:
            return True
        return isinstance(name, str) and self.node in name.lower()

    def layer_ok(self, layer: Any) -> bool:
        """Rows about one layer: only a layer filter narrows them."""
        return self.layer is None or layer == self.layer

    def experts_ok(self, pairs: Any) -> bool:
        """Rows holding [[layer, expert], ...]: kept when any pair is on the layer."""
        if self.layer is None:
            return True
        if not isinstance(pairs, list | tuple):
            return False
        return any(isinstance(p, list | tuple) and p and p[0] == self.layer for p in pairs)

    def instance_ok(self, instance: Mapping[str, Any]) -> bool:
        return self.node_ok(instance.get("node")) and self.experts_ok(instance.get("experts"))
