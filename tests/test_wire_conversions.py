"""The hand-written conversions to protobuf give what protobuf's own generic ones give.

`keel_core.json_values.to_value` builds a google.protobuf.Value directly and
`engine_service.wire.messages.timestamp` computes a Timestamp in integer arithmetic: both are on the
path of every run an engine answers with (issue 13), and must stay byte-for-byte what
`json_format.ParseDict` and `Timestamp.FromDatetime` make.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone, tzinfo
from typing import Any

from google.protobuf import json_format, struct_pb2, timestamp_pb2
from hypothesis import given
from hypothesis import strategies as st

from engine_service.wire.messages import timestamp
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
