"""Fuzzing the API's JSON body parser (issue #18): whatever body a client
sends, :func:`parse_json` answers with the API's own 400 error or a value,
never another exception, and its work is linear in the body's size.

Seeds are ``tests/fixtures/fuzz/json/``; hypothesis cuts them and splices in
what matters to a JSON parser (deep nesting, surrogates, huge numbers).
"""

from __future__ import annotations

from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from httpapi.body import parse_json
from httpapi.errors import ApiError
from tests.linearity import assert_linear

SEEDS = [p.read_bytes() for p in sorted(
    (Path(__file__).resolve().parents[1] / "fixtures" / "fuzz" / "json").glob("*.json")
)]
TOKENS = [b"[" * 2000, b"{\"a\":" * 700, b"\"\\ud800\"", b"\"\\udfff\\ud800\"", b"1e999999",
          b"9" * 5000, b"\xff", b"\x00", b"\"", b"\\", b",", b":", b"NaN", b"-Infinity"]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    seed = draw(st.sampled_from(SEEDS))
    cut = draw(st.integers(0, len(seed)))
    middle = b"".join(draw(st.lists(st.one_of(st.sampled_from(TOKENS), st.binary(max_size=8)),
                                    max_size=4)))
    return seed[:cut] + middle + seed[cut:]


def _parse(data: bytes) -> None:
    try:
        parse_json(data)
    except ApiError as exc:
        assert exc.status == 400


def test_the_corpus_parses() -> None:
    assert len(SEEDS) >= 5
    for seed in SEEDS:
        parse_json(seed)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(mutated(), st.binary(max_size=300)))
def test_only_the_apis_400_escapes(data: bytes) -> None:
    _parse(data)


def test_bodies_cost_linear_time() -> None:
    assert_linear(lambda n: _parse(b"[" * n + b"]" * n), 4_000)
    assert_linear(lambda n: _parse(b'{"a": "' + b"\\u00e9" * n + b'"}'), 8_000)
    assert_linear(lambda n: _parse(b"[" + b"1," * n + b"1]"), 8_000)
