"""A small least-recently-used map: what was seen lately, kept up to a capacity."""

from __future__ import annotations

import collections
from collections.abc import Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Recent(Generic[K, V]):
    """Up to `capacity` items; putting one more drops the least recently used."""

    def __init__(self, capacity: int) -> None:
        self._items: collections.OrderedDict[K, V] = collections.OrderedDict()
        self._capacity = capacity

    def get(self, key: K) -> V | None:
        """The item, if held."""
        item = self._items.get(key)
        if item is not None:
            self._items.move_to_end(key)
        return item

    def drop(self, key: K) -> None:
        """Forget the item, if held."""
        self._items.pop(key, None)

    def put(self, key: K, item: V) -> None:
        """Hold the item, dropping the least recently used beyond capacity."""
        items = self._items
        if key in items:
            items.move_to_end(key)
        items[key] = item  # a new key goes to the end
        while len(items) > self._capacity:
            items.popitem(last=False)
