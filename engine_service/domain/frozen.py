"""Building frozen dataclasses on the hot path without their generated `__init__`.

A frozen dataclass's `__init__` sets each field through `object.__setattr__` (its own
`__setattr__` refuses), and `dataclasses.replace` first walks the fields to gather them: a run's
history (14 fields) is built after every decision, and every decided event is copied once to be
stamped with its time. These two helpers fill the instance's `__dict__` directly, which is what
`__init__` ends up with. They are for the engine's own plain frozen dataclasses only: no `__slots__`,
no `__post_init__`, no `InitVar`, and no `functools.cached_property` (`with_changes` would copy what
was cached of the original; RunManifest, PipelineSpec and BuildProvenance cache their canonical
bytes, and PipelineSpec its steps' order and ancestors). tests/engine/test_frozen.py holds them to
what `__init__` and `replace` make.
"""

from __future__ import annotations

from typing import Any, TypeVar

T = TypeVar("T")


def build(cls: type[T], **fields: Any) -> T:
    """`cls(**fields)`, given every field of `cls` (none is left to its default)."""
    instance = object.__new__(cls)
    instance.__dict__.update(fields)
    return instance


def with_changes(instance: T, **changes: Any) -> T:
    """`dataclasses.replace(instance, **changes)`."""
    copy = object.__new__(type(instance))
    copy.__dict__.update(instance.__dict__, **changes)
    return copy


__all__ = ["build", "with_changes"]
