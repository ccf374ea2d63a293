"""The blob GC settings (``storage.gc_interval_seconds``,
``storage.gc_grace_seconds``): defaults, 0 allowed, negative refused with
the key named; and a serving process starts the GC loop only when on."""

from __future__ import annotations

import asyncio
import random

import pytest

from conf.settings import ConfigError, load_settings
from runtime.daemon import start_blob_gc


def test_defaults_and_zero() -> None:
    settings = load_settings(None, [])
    assert settings.storage.gc_interval_seconds == 3600
    assert settings.storage.gc_grace_seconds == 3600
    zero = load_settings(None, ["storage.gc_interval_seconds=0", "storage.gc_grace_seconds=0"])
    assert (zero.storage.gc_interval_seconds, zero.storage.gc_grace_seconds) == (0, 0)


@pytest.mark.parametrize("key", ["gc_interval_seconds", "gc_grace_seconds"])
def test_negative_is_refused(key: str) -> None:
    value = -random.uniform(0.001, 10_000)
    with pytest.raises(ConfigError, match=f"storage.{key}"):
        load_settings(None, [f"storage.{key}={value}"])


async def test_the_loop_runs_only_when_on() -> None:
    off = load_settings(None, ["storage.gc_interval_seconds=0"])
    assert start_blob_gc(off, object()) is None
    on = load_settings(None, [f"storage.gc_interval_seconds={random.randint(60, 9999)}"])
    task = start_blob_gc(on, object())
    assert task is not None and not task.done()  # sleeping until its first pass
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
