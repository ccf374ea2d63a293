"""The API's JSON encoder: the document json would give, whatever the input."""

from __future__ import annotations

import json
import random

from hypothesis import given
from hypothesis import strategies as st

from httpapi.views import encode_json, json_response

# Everything a view may hold: text with any code point (lone surrogates come
# from undecodable headers), integers past 64 bits, nesting.
values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(st.characters(exclude_categories=())),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(), inner, max_size=5),
    max_leaves=30,
)


@given(values)
def test_encoded_json_decodes_to_the_same_value(value: object) -> None:
    encoded = encode_json(value)
    assert isinstance(encoded, bytes)
    assert json.loads(encoded) == value


def test_lone_surrogates_and_huge_integers_are_encoded_not_refused() -> None:
    surrogate = chr(random.randint(0xD800, 0xDFFF))
    big = 2 ** random.randint(65, 200) + random.randint(0, 1000)
    value = {"subject": f"caf{surrogate}", "size": big, "id": [big, -big]}
    assert json.loads(encode_json(value)) == value


def test_response_headers_match_aiohttps_json_response() -> None:
    response = json_response({"a": [1, "é"]}, status=201, headers={"Retry-After": "3"})
    assert response.status == 201
    assert response.headers["Content-Type"] == "application/json; charset=utf-8"
    assert response.headers["Retry-After"] == "3"
    assert json.loads(response.body) == {"a": [1, "é"]}
