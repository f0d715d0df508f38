"""The answer path's shortcuts make exactly what the plain code makes: ``stored_response`` is a
``StoredResponse`` like one built by its constructor (equal, hashed, shown and frozen alike)."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge.cache.entry import StoredResponse, stored_response
from edge.cache.policy import Freshness

FIELD_BYTES = st.binary(max_size=12)
FRESHNESS = st.builds(
    Freshness,
    st.floats(0, 2e9),
    st.floats(0, 1e6),
    st.floats(-1, 1e6),
    st.floats(0, 1e3),
    st.floats(0, 1e3),
    st.booleans(),
    st.booleans(),
)
FIELDS = st.tuples(
    st.integers(100, 599),
    FIELD_BYTES,
    st.lists(st.tuples(FIELD_BYTES, FIELD_BYTES), max_size=4).map(tuple),
    FIELD_BYTES,
    FRESHNESS,
    st.lists(FIELD_BYTES, max_size=3).map(tuple),
    st.lists(st.text(max_size=5), max_size=3).map(tuple),
    st.none() | FIELD_BYTES,
    st.booleans(),
    st.booleans(),
)


@given(FIELDS)
def test_stored_response_is_the_constructors(fields: tuple[object, ...]) -> None:
    made = stored_response(*fields)  # type: ignore[arg-type]
    plain = StoredResponse(*fields)  # type: ignore[arg-type]
    assert type(made) is StoredResponse
    assert made == plain and plain == made
    assert hash(made) == hash(plain)
    assert repr(made) == repr(plain)
    assert dataclasses.astuple(made) == dataclasses.astuple(plain)
    assert dataclasses.replace(made, status=204) == dataclasses.replace(plain, status=204)
    with pytest.raises(dataclasses.FrozenInstanceError):
        made.status = 1  # type: ignore[misc]
