"""``server.max_message_size``, the one message size limit: 25 MiB by
default; the per-protocol keys of older configurations are read as it
(with a warning naming the new key); two different values are refused."""

from __future__ import annotations

import logging
import random
import re

import pytest

from conf.settings import ConfigError, load_settings

OLD = ["smtp.max_message_size", "imap.max_literal_size", "http.max_message_size"]


def test_default_is_25_mib() -> None:
    assert load_settings(None, []).server.max_message_size == 25 * 1024 * 1024


@pytest.mark.parametrize("old", OLD)
def test_an_old_key_is_mapped_with_a_warning(old: str, caplog: pytest.LogCaptureFixture) -> None:
    value = random.randint(1, 10**9)
    with caplog.at_level(logging.WARNING, logger="conf.settings"):
        settings = load_settings(None, [f"{old}={value}"])
    assert settings.server.max_message_size == value
    assert f"{old} is now server.max_message_size" in caplog.text
    section, key = old.split(".")
    assert not hasattr(getattr(settings, section), key)  # nothing reads the old key


def test_an_old_key_agreeing_with_the_new_one_is_accepted() -> None:
    value = random.randint(1, 10**9)
    settings = load_settings(None, [f"server.max_message_size={value}", f"{OLD[0]}={value}"])
    assert settings.server.max_message_size == value


@pytest.mark.parametrize("old", OLD)
def test_different_values_are_refused(old: str) -> None:
    value = random.randint(2, 10**9)
    with pytest.raises(ConfigError, match=re.escape("set only server.max_message_size")):
        load_settings(None, [f"server.max_message_size={value}", f"{old}={value - 1}"])


def test_zero_or_negative_is_refused() -> None:
    with pytest.raises(ConfigError, match=re.escape("server.max_message_size")):
        load_settings(None, [f"server.max_message_size={-random.randint(0, 99)}"])
