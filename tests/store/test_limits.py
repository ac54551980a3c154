"""The store's whole-append event check against its per-event one."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from store_service import limits

# Control characters, a non-ASCII space and a line separator (allowed, not printable), and letters.
TYPE_CHARACTERS = st.sampled_from(
    ["\x00", "\x07", "\x1f", "\x7f", "\x85", "\x9f", "\xa0", "\u2028", "a", "Z", "é"]
)
TYPES = st.one_of(
    st.text(TYPE_CHARACTERS, max_size=6),
    st.sampled_from(["", "T" * limits.MAX_EVENT_TYPE_CHARS, "T" * (limits.MAX_EVENT_TYPE_CHARS + 1)]),
)
# Payloads made once: at the limit and one byte past it among small ones.
PAYLOADS = st.sampled_from(
    [b"", b"{}", b"x" * limits.MAX_EVENT_PAYLOAD_BYTES, b"x" * (limits.MAX_EVENT_PAYLOAD_BYTES + 1)]
)


@given(st.lists(st.tuples(TYPES, PAYLOADS), min_size=1, max_size=8))
def test_an_append_is_plainly_valid_only_if_every_event_is_and_always_when_its_types_are_printable(
    events: list[tuple[str, bytes]],
) -> None:
    types = [type_name for type_name, _ in events]
    payloads = [payload for _, payload in events]
    each_valid = all(limits.event_is_valid(t, len(p)) for t, p in events)
    plainly = limits.events_plainly_valid(types, payloads)
    if plainly:
        assert each_valid
    if each_valid and all(t.isprintable() for t in types):
        assert plainly
