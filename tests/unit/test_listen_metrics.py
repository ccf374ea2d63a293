"""runtime.scrape: the metrics endpoint answers GET /metrics and nothing else."""

from __future__ import annotations

import random

import pytest

from runtime.metrics import CONTENT_TYPE, REGISTRY
from runtime.scrape import _with_slot, answer


def test_get_metrics_renders_the_registry() -> None:
    response = answer(b"GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\n\r\n")
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert f"Content-Type: {CONTENT_TYPE}".encode() in head
    assert f"Content-Length: {len(body)}".encode() in head
    assert body.decode() == REGISTRY.render()


def test_head_has_no_body_and_other_methods_and_paths_are_refused() -> None:
    head = answer(b"HEAD /metrics HTTP/1.1\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and head.endswith(b"\r\n\r\n")
    post = answer(b"POST /metrics HTTP/1.1\r\n\r\n")
    assert post.startswith(b"HTTP/1.1 405 ") and b"Allow: GET, HEAD" in post
    for path in (b"/", b"/metrics/x", b"/v1/folders"):
        assert answer(b"GET " + path + b" HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 404 ")


@pytest.mark.parametrize("seed", range(20))
def test_garbage_gets_an_http_answer_never_an_exception(seed: int) -> None:
    rng = random.Random(seed)
    junk = rng.randbytes(rng.randrange(0, 700))
    assert answer(junk).startswith(b"HTTP/1.1 ")


def test_each_worker_slot_has_a_port_of_its_own() -> None:
    assert _with_slot("127.0.0.1:9480", 0) == "127.0.0.1:9480"
    assert _with_slot("127.0.0.1:9480", 3) == "127.0.0.1:9483"
    assert _with_slot("[::1]:9480", 1) == "[::1]:9481"
    assert _with_slot("127.0.0.1:0", 2) == "127.0.0.1:0"
