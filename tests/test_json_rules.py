"""The JSON rule: valid values pass; a fault is refused with the path to its first place."""

from __future__ import annotations

import math
from typing import Any

import pytest

from keel_core.errors import KeelError
from keel_core.json_rules import MAX_EXACT_INT, MAX_JSON_DEPTH, check_json, nests_too_deeply


def nested(levels: int) -> Any:
    value: Any = 1
    for level in range(levels):
        value = [value] if level % 2 else {"k": value}
    return value


@pytest.mark.parametrize(
    "value",
    [
        *(None, True, "s", 0, -MAX_EXACT_INT, MAX_EXACT_INT, 1.5, [], {}),
        {"a": [1, {"b": None}]},
        nested(MAX_JSON_DEPTH),
    ],
)
def test_valid_values_pass(value: Any) -> None:
    check_json(value, "output")


@pytest.mark.parametrize(
    ("value", "path", "why"),
    [
        ({"a": [1, {"b": math.nan}]}, "output.a[1].b", "not a JSON number"),
        ([0, MAX_EXACT_INT + 1], "output[1]", "beyond 2**53"),
        ({"a": {1: "x"}}, "output.a", "object key 1 is not a string"),
        ({"a": (1, 2)}, "output.a", "tuple is not JSON"),
        ({"a": b"x"}, "output.a", "bytes is not JSON"),
        ([nested(MAX_JSON_DEPTH)], "output[0][0]" + ".k[0]" * (MAX_JSON_DEPTH // 2 - 1), "nests deeper"),
    ],
)
def test_a_fault_is_named_by_its_path(value: Any, path: str, why: str) -> None:
    with pytest.raises(KeelError) as caught:
        check_json(value, "output")
    assert caught.value.code == "invalid_json"
    assert caught.value.message.startswith(f"{path}: ")
    assert why in caught.value.message


@pytest.mark.parametrize("within", [0, 1, 2, 3])
def test_a_value_recorded_within_others_nests_that_many_levels_less(within: int) -> None:
    limit = MAX_JSON_DEPTH - within
    check_json(nested(limit), "answer", within=within)
    with pytest.raises(KeelError) as caught:
        check_json(nested(limit + 1), "answer", within=within)
    assert caught.value.code == "invalid_json"
    assert f"nests deeper than {limit} levels of arrays and objects" in caught.value.message
    assert ("down in a value that may nest" in caught.value.message) == (within > 0)
    assert nests_too_deeply(caught.value) and caught.value.details["max_depth"] == limit


def test_a_value_that_is_not_json_is_not_taken_for_one_too_deep() -> None:
    with pytest.raises(KeelError) as caught:
        check_json({"a": [math.nan]}, "answer", within=2)
    assert not nests_too_deeply(caught.value)
