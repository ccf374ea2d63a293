#!/usr/bin/env bash
# Install everything the test suite needs on a Debian machine (as root) and run it.
# The suite starts its own PostgreSQL, dnsmasq, Postfix, Redis... on loopback.
set -euo pipefail
cd "$(dirname "$0")/.."

export DEBIAN_FRONTEND=noninteractive
PACKAGES=(
  python3-venv python3-dev build-essential   # venv and wheels that compile
  postgresql                                  # contract suite on a real PostgreSQL
  dnsmasq-base                                # the tests' DNS server (MX, SPF, DKIM, DMARC records)
  swaks                                       # SMTP client
  curl                                        # the README's HTTP examples, SMTP with bare LF
  libnet-ssleay-perl libio-socket-ssl-perl    # swaks's STARTTLS/TLS (Debian only recommends them)
  isync fetchmail mpop                        # IMAP/POP3 clients
  postfix                                     # peer MTA for the outbound relay tests
  postfix-policyd-spf-python                  # SPF checks at that peer (forwarding with SRS)
  postsrsd                                    # SRS addresses made alike by PostSRSd and by us
  redis-server                                # shared limits and the Redis event bus
  clamav-daemon clamav                        # anti-virus checks (clamd; sigtool builds the test signatures)
  rspamd                                      # anti-spam checks and Junk learning (rspamd on loopback)
  swift-proxy swift-account swift-container swift-object  # S3-compatible blob store (Swift s3api)
  chromium                                    # webmail browser test (driven by Playwright)
  procps iproute2 ca-certificates
)
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  # Postfix only serves as a peer the tests configure themselves.
  echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Debian's postgresql and redis-server packages may start servers of their own (5432, 6379); the
# tests never use those: they start their own on free ports (tests/pgserver.py, tests/redisserver.py).
VENV=${SHARDMAIL_VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q -e '.[test]'

"$VENV/bin/ruff" check .
# The tests talk only to loopback. Where the kernel lets us, they run in a
# network namespace of their own that has nothing but "lo", so a lookup or
# connection to any other address fails at once instead of leaving the machine.
run_pytest() {
  if unshare --net true 2>/dev/null; then
    unshare --net sh -c 'ip link set lo up && exec "$@"' sh "$VENV/bin/python" -m pytest -q -ra "$@"
  else
    echo "note: unshare --net is not permitted here; running the tests in the host's network namespace" >&2
    "$VENV/bin/python" -m pytest -q -ra "$@"
  fi
}
# Most tests wait on sockets and servers more than they compute, so they run WORKERS at a
# time (pytest-xdist; a module's tests stay together). Those marked serial (tests/conftest.py
# SERIAL: latency budgets, floods, cluster drills) then run alone. Exit status 5 is "no test
# selected", when the arguments name only tests of the other kind.
WORKERS=${SHARDMAIL_TEST_WORKERS:-3}
run_both() {
  local first=0 second=0
  run_pytest -n "$WORKERS" --dist loadfile -m "not serial" "$@" || first=$?
  ((first == 0 || first == 5)) || return "$first"
  run_pytest -m serial "$@" || second=$?
  ((second == 0 || second == 5)) || return "$second"
  ((first == 0 || second == 0))  # neither selected anything: fail, as pytest would
}
run_both "$@"
# The whole suite (no arguments): then real clients again with every site's storage on
# PostgreSQL (tests/conftest.py storage_url), IMAP, SMTP, POP3, the HTTP API and mailctl, and
# SIGKILL of an imapd under APPENDs, ~5 minutes.
if (($# == 0)); then
  SHARDMAIL_TEST_BACKEND=postgresql run_both \
    tests/integration/imap/test_imap_clients.py tests/integration/smtp/test_smtp_clients.py \
    tests/integration/pop3 tests/integration/http/test_api.py \
    tests/integration/imap/test_imap_crash.py tests/integration/test_cross_process_push.py \
    tests/integration/test_mailctl.py
fi
