"""Run labels: the rules a StartRun's labels (and a ListRuns label filter) must follow, and how a run's
identity and labels become the attributes its stream is indexed by in the store.

The rules are those of Kubernetes labels, which operators already know and whose bounds keep an
index small: a key is an optional prefix (a DNS subdomain of at most 253 characters) and `/`, then a
name of 1 to 63 characters of `[A-Za-z0-9_.-]` that starts and ends alphanumeric; a value is empty or
follows the name rule. On top of that a run has at most MAX_LABELS labels of at most
MAX_LABEL_BYTES of keys and values together (Kubernetes bounds the whole object instead).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from keel_core.errors import KeelError, invalid_argument

MAX_LABELS = 64
MAX_LABEL_BYTES = 16 * 1024
MAX_NAME_CHARS = 63
MAX_PREFIX_CHARS = 253

_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9_.-]*[A-Za-z0-9])?")
_DNS_LABEL = r"[a-z0-9]([a-z0-9-]*[a-z0-9])?"
_PREFIX = re.compile(rf"{_DNS_LABEL}(\.{_DNS_LABEL})*")

# Store attribute keys of a run stream. A run's own facts and its labels live in separate key spaces,
# so no label can pose as the pipeline id or the lineage.
PIPELINE_ATTRIBUTE = "run/pipeline"
LINEAGE_ATTRIBUTE = "run/lineage"
PARENT_ATTRIBUTE = "run/parent"
# A rerun's stream names the run it reran, so that the old run's view finds its reruns with one
# indexed ListStreams.
RERUN_OF_ATTRIBUTE = "run/rerun-of"
LABEL_ATTRIBUTE_PREFIX = "label:"
TOP_LEVEL = "top-level"
CHILD = "child"


def _bad(what: str, why: str, **details: object) -> KeelError:
    return invalid_argument(
        "invalid_labels",
        f"{what}: {why} (label rules: those of Kubernetes: [prefix/]name, name and value 1 to 63 "
        f"characters of A-Z a-z 0-9 _ . - starting and ending alphanumeric, a value may be empty; "
        f"prefix a lower-case DNS subdomain of at most {MAX_PREFIX_CHARS} characters; at most "
        f"{MAX_LABELS} labels and {MAX_LABEL_BYTES} bytes in all)",
        **details,
    )


def _check_key(key: str, what: str) -> None:
    prefix, slash, name = key.rpartition("/")
    if slash and (len(prefix) > MAX_PREFIX_CHARS or not _PREFIX.fullmatch(prefix)):
        raise _bad(what, f"key {key[:80]!r} has an invalid prefix {prefix[:80]!r}", key=key[:320])
    if len(name) > MAX_NAME_CHARS or not _NAME.fullmatch(name):
        raise _bad(what, f"key {key[:80]!r} has an invalid name {name[:80]!r}", key=key[:320])


def check_labels(labels: Mapping[str, str], what: str = "labels") -> dict[str, str]:
    """`labels` as a dict if they follow the rules above, else INVALID_ARGUMENT `invalid_labels`."""
    if len(labels) > MAX_LABELS:
        raise _bad(what, f"{len(labels)} labels, more than {MAX_LABELS}", count=len(labels))
    size = sum(len(k.encode()) + len(v.encode()) for k, v in labels.items())
    if size > MAX_LABEL_BYTES:
        raise _bad(what, f"{size} bytes of keys and values, more than {MAX_LABEL_BYTES}", size=size)
    for key, value in labels.items():
        _check_key(key, what)
        if value and (len(value) > MAX_NAME_CHARS or not _NAME.fullmatch(value)):
            raise _bad(what, f"label {key!r} has an invalid value {value[:80]!r}", key=key)
    return dict(labels)


def run_attributes(op_id: str, parent_run_id: str, labels: Mapping[str, str]) -> dict[str, str]:
    """The attributes a run stream is indexed by: its pipeline id, lineage, parent and labels."""
    attributes = {PIPELINE_ATTRIBUTE: op_id, LINEAGE_ATTRIBUTE: CHILD if parent_run_id else TOP_LEVEL}
    if parent_run_id:
        attributes[PARENT_ATTRIBUTE] = parent_run_id
    attributes.update((LABEL_ATTRIBUTE_PREFIX + key, value) for key, value in labels.items())
    return attributes


def labels_of(attributes: Mapping[str, str]) -> dict[str, str]:
    """The run labels among a run stream's attributes."""
    return {
        key.removeprefix(LABEL_ATTRIBUTE_PREFIX): value
        for key, value in attributes.items()
        if key.startswith(LABEL_ATTRIBUTE_PREFIX)
    }


def label_filter(labels: Mapping[str, str]) -> dict[str, str]:
    """The attribute filter matching runs that carry every one of `labels`."""
    return {LABEL_ATTRIBUTE_PREFIX + key: value for key, value in labels.items()}
