"""Hypothesis strategies for the property tests: any JSON a client could send."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

# Any string a JSON document can carry, including lone surrogates (from \\ud800 escapes),
# which plain text() never draws.
any_text = st.text(max_size=12) | st.text(st.characters(categories=["Cs"]), min_size=1, max_size=2)


def any_json(max_leaves: int) -> st.SearchStrategy[Any]:
    """Any JSON document: scalars (big integers and surrogates included), lists, objects."""
    scalars = (
        st.none()
        | st.booleans()
        | st.integers(-(2**70), 2**70)
        | st.floats(allow_nan=False, allow_infinity=False)
        | any_text
    )
    return st.recursive(
        scalars,
        lambda inner: (
            st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
        ),
        max_leaves=max_leaves,
    )
