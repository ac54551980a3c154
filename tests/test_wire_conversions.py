"""The hand-written conversions to protobuf give what protobuf's own generic ones give.

`keel_core.json_values.to_value` builds a google.protobuf.Value directly and
`engine_service.wire.messages.timestamp` computes a Timestamp in integer arithmetic: both are on the
path of every run an engine answers with (issue 13), and must stay byte-for-byte what
`json_format.ParseDict` and `Timestamp.FromDatetime` make.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone, tzinfo
from typing import Any

import pytest
from google.protobuf import json_format, struct_pb2, timestamp_pb2
from hypothesis import given
from hypothesis import strategies as st

from engine_service.wire.messages import timestamp
from keel_core.errors import KeelError
from keel_core.json_rules import MAX_JSON_DEPTH, check_json
from keel_core.json_values import from_value, to_value

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**53), max_value=2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.characters(exclude_categories=["Cs"])),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4)
    ),
    max_leaves=20,
)


@given(JSON)
def test_to_value_makes_what_parse_dict_makes(data: Any) -> None:
    expected = struct_pb2.Value()
    json_format.ParseDict(data, expected)
    made = to_value(data)
    assert made == expected
    assert made.SerializeToString(deterministic=True) == expected.SerializeToString(deterministic=True)
    assert from_value(made) == from_value(expected)


def nested(depth: int, leaf: Any = 1) -> Any:
    """`leaf` inside `depth` levels of alternating objects and arrays."""
    for level in range(depth):
        leaf = {"k": leaf} if level % 2 else [leaf]
    return leaf


BROKEN = [
    float("nan"),
    {"a": [1, float("inf")]},
    2**53 + 1,
    {"a": {"b": -(2**60)}},
    "lone \udc80 surrogate",
    {"k\ud800": 1},
    {1: "int key"},
    {"a": (1, 2)},
    [b"bytes"],
    {"a": {"set": {1}}},
    nested(MAX_JSON_DEPTH + 1),
    {"deep": nested(MAX_JSON_DEPTH)},
]


@pytest.mark.parametrize("data", BROKEN, ids=range(len(BROKEN)))
def test_to_value_refuses_what_check_json_refuses_with_the_same_error(data: Any) -> None:
    # to_value checks as it builds, in one walk: it must refuse exactly what json_rules refuses.
    with pytest.raises(KeelError) as expected:
        check_json(data, "input")
    with pytest.raises(KeelError) as refused:
        to_value(data, "input")
    assert (refused.value.code, refused.value.message) == (expected.value.code, expected.value.message)
    assert refused.value.details == expected.value.details


# Values that may break the rule anywhere: bad leaves and keys mixed in with good ones, nested.
ANYTHING = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**60), max_value=2**60)
    | st.floats()
    | st.text(max_size=3)
    | st.sampled_from(["\udc80", b"bytes", (1,), {1}]),
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(st.text(max_size=3) | st.integers(0, 2), children, max_size=3)
    ),
    max_leaves=12,
)


@given(ANYTHING)
def test_to_value_keeps_and_refuses_what_check_json_does(data: Any) -> None:
    try:
        check_json(data, "v")
    except KeelError as expected:
        with pytest.raises(KeelError) as refused:
            to_value(data, "v")
        got = refused.value
        assert (got.code, got.message, got.details) == (expected.code, expected.message, expected.details)
    else:
        parsed = struct_pb2.Value()
        json_format.ParseDict(data, parsed)
        assert to_value(data, "v") == parsed


def test_to_value_keeps_a_value_at_the_deepest_nesting_allowed() -> None:
    deepest = {"a": "text", "b": nested(MAX_JSON_DEPTH - 1, "leaf")}
    check_json(deepest)
    assert from_value(to_value(deepest)) == deepest


def test_empty_objects_and_lists_stay_objects_and_lists() -> None:
    assert to_value({}).WhichOneof("kind") == "struct_value"
    assert to_value([]).WhichOneof("kind") == "list_value"
    assert from_value(to_value({"a": {}, "b": [[]]})) == {"a": {}, "b": [[]]}


ZONES: st.SearchStrategy[tzinfo | None] = st.sampled_from(
    [None, UTC, timezone(timedelta(hours=-7, minutes=-30))]
)


@given(st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30)), ZONES)
def test_timestamp_is_what_from_datetime_makes(naive: datetime, zone: tzinfo | None) -> None:
    when = naive.replace(tzinfo=zone)
    expected = timestamp_pb2.Timestamp()
    expected.FromDatetime(when)
    assert timestamp(when) == expected
