"""``[queue] tls_policy`` and its neighbours: validated at load, refused
with a message naming the key when incoherent."""

from __future__ import annotations

import pytest

from conf.settings import ConfigError, load_settings
from mtad.outbound.tlspolicy import TlsPolicy


def load(tmp_path, text: str):
    path = tmp_path / "shardmail.toml"
    path.write_text(text)
    return load_settings(path)


def test_levels_are_read_and_domains_normalized(tmp_path) -> None:
    settings = load(
        tmp_path,
        '[dns]\ntrust_ad = true\n[queue]\nrequire_tls_domains = ["old.test"]\n'
        '[queue.tls_policy]\n"Bank.Example." = "dane"\n"partner.test" = "encrypt"\n'
        '"legacy.test" = "none"\n"sts.test" = "mta-sts"\n',
    )
    assert settings.queue.tls_policy == {
        "bank.example": "dane",
        "partner.test": "encrypt",
        "legacy.test": "none",
        "sts.test": "mta-sts",
    }
    policy = TlsPolicy.from_settings(settings.queue, trust_ad=True)
    # require_tls_domains keeps its meaning: verified TLS.
    assert policy.levels["old.test"] == "verify" and policy.requires("OLD.test")
    assert policy.requires("partner.test") and not policy.requires("legacy.test")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[queue.tls_policy]\n"a.test" = "secure"\n', "queue.tls_policy.a.test"),
        ('[queue.tls_policy]\n"a.test" = "dane"\n', "dns.trust_ad"),
        ('[queue.tls_policy]\n"a b" = "may"\n', "not a domain"),
        (
            '[queue]\nrequire_tls_domains = ["a.test"]\n[queue.tls_policy]\n"a.test" = "may"\n',
            "require_tls_domains: a.test is also tls_policy 'may'",
        ),
        ("[queue]\nmta_sts_port = 8443\n", "test benches only"),
        ("[queue]\nsmtp_port = 2525\nmta_sts = false\nmta_sts_port = 8443\n", "MTA-STS is off"),
    ],
)
def test_incoherent_settings_are_refused(tmp_path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load(tmp_path, text)


def test_a_test_bench_may_move_the_policy_port(tmp_path) -> None:
    settings = load(tmp_path, "[queue]\nsmtp_port = 2525\nmta_sts_port = 8443\n")
    assert settings.queue.mta_sts_port == 8443
