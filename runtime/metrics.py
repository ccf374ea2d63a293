"""A tiny process-global metrics registry, rendered in the Prometheus text format.

Contract: every daemon of the process (mtad, imapd, httpapi) imports this
module (it does not import aiohttp) and updates the metrics below or
registers its own with :func:`counter`, :func:`gauge` and :func:`histogram`;
``GET /metrics`` on the HTTP API renders :data:`REGISTRY`. Updates are plain
in-memory arithmetic, safe from the event loop; each process (each instance)
exposes its own numbers and Prometheus sums them across instances.

Format: Prometheus text exposition format 0.0.4 (``# HELP``, ``# TYPE``,
``name{label="value"} number``).
"""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Iterable, Sequence

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Latency buckets in seconds: from a fast in-memory hit to a slow remote SMTP dialogue.
DEFAULT_BUCKETS: tuple[float, ...] = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)

LabelValues = tuple[str, ...]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _format_value(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer():
        return str(int(value))
    return repr(float(value))


class _Metric:
    kind = "untyped"

    def __init__(self, name: str, help_text: str, labels: Sequence[str] = ()) -> None:
        self.name = name
        self.help = help_text
        self.label_names = tuple(labels)
        self._lock = threading.Lock()  # daemons may update from worker threads

    def _key(self, labels: dict[str, str]) -> LabelValues:
        if set(labels) != set(self.label_names):
            raise ValueError(f"{self.name}: labels {sorted(labels)} != {list(self.label_names)}")
        return tuple(str(labels[n]) for n in self.label_names)

    def _label_text(self, values: LabelValues, extra: tuple[tuple[str, str], ...] = ()) -> str:
        pairs = [*zip(self.label_names, values, strict=True), *extra]
        if not pairs:
            return ""
        return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in pairs) + "}"

    def samples(self) -> Iterable[str]:
        raise NotImplementedError

    def render(self) -> str:
        head = f"# HELP {self.name} {self.help}\n# TYPE {self.name} {self.kind}\n"
        return head + "".join(line + "\n" for line in self.samples())


class Counter(_Metric):
    """A monotonically increasing count (``*_total``)."""

    kind = "counter"

    def __init__(self, name: str, help_text: str, labels: Sequence[str] = ()) -> None:
        super().__init__(name, help_text, labels)
        self._values: dict[LabelValues, float] = {} if labels else {(): 0.0}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        if amount < 0:
            raise ValueError("a counter only goes up")
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        return self._values.get(self._key(labels), 0.0)

    def samples(self) -> Iterable[str]:
        for key, value in sorted(self._values.items()):
            yield f"{self.name}{self._label_text(key)} {_format_value(value)}"


class Gauge(_Metric):
    """A value that goes up and down (open connections, queue length)."""

    kind = "gauge"

    def __init__(self, name: str, help_text: str, labels: Sequence[str] = ()) -> None:
        super().__init__(name, help_text, labels)
        self._values: dict[LabelValues, float] = {} if labels else {(): 0.0}

    def set(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = float(value)

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def dec(self, amount: float = 1.0, **labels: str) -> None:
        self.inc(-amount, **labels)

    def value(self, **labels: str) -> float:
        return self._values.get(self._key(labels), 0.0)

    def samples(self) -> Iterable[str]:
        for key, value in sorted(self._values.items()):
            yield f"{self.name}{self._label_text(key)} {_format_value(value)}"


class Histogram(_Metric):
    """Observations counted into cumulative ``le`` buckets, with sum and count."""

    kind = "histogram"

    def __init__(
        self,
        name: str,
        help_text: str,
        labels: Sequence[str] = (),
        buckets: Sequence[float] = DEFAULT_BUCKETS,
    ) -> None:
        super().__init__(name, help_text, labels)
        self.buckets = tuple(sorted(buckets))
        # per label set: (per-bucket counts, +Inf count is the total), sum
        self._values: dict[LabelValues, tuple[list[int], list[float]]] = {}

    def observe(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            counts, total = self._values.setdefault(key, ([0] * (len(self.buckets) + 1), [0.0]))
            counts[bisect.bisect_left(self.buckets, value)] += 1
            total[0] += value

    def count(self, **labels: str) -> int:
        entry = self._values.get(self._key(labels))
        return sum(entry[0]) if entry else 0

    def samples(self) -> Iterable[str]:
        for key, (counts, total) in sorted(self._values.items()):
            running = 0
            for bound, n in zip(self.buckets, counts, strict=False):
                running += n
                le = (("le", _format_value(bound)),)
                yield f"{self.name}_bucket{self._label_text(key, le)} {running}"
            running += counts[-1]
            yield f"{self.name}_bucket{self._label_text(key, (('le', '+Inf'),))} {running}"
            yield f"{self.name}_sum{self._label_text(key)} {_format_value(total[0])}"
            yield f"{self.name}_count{self._label_text(key)} {running}"


class Registry:
    """Named metrics; registering the same name twice returns the first one
    (so modules may declare what they use without coordinating), but a
    different kind or label set under one name is a bug and raises."""

    def __init__(self) -> None:
        self._metrics: dict[str, _Metric] = {}
        self._lock = threading.Lock()

    def _register(self, metric: _Metric) -> _Metric:
        with self._lock:
            existing = self._metrics.get(metric.name)
            if existing is None:
                self._metrics[metric.name] = metric
                return metric
        if type(existing) is not type(metric) or existing.label_names != metric.label_names:
            raise ValueError(f"metric {metric.name} already registered differently")
        return existing

    def get(self, name: str) -> _Metric | None:
        return self._metrics.get(name)

    def render(self) -> str:
        return "".join(m.render() for _, m in sorted(self._metrics.items()))


REGISTRY = Registry()


def counter(name: str, help_text: str, labels: Sequence[str] = ()) -> Counter:
    metric = REGISTRY._register(Counter(name, help_text, labels))
    assert isinstance(metric, Counter)
    return metric


def gauge(name: str, help_text: str, labels: Sequence[str] = ()) -> Gauge:
    metric = REGISTRY._register(Gauge(name, help_text, labels))
    assert isinstance(metric, Gauge)
    return metric


def histogram(
    name: str,
    help_text: str,
    labels: Sequence[str] = (),
    buckets: Sequence[float] = DEFAULT_BUCKETS,
) -> Histogram:
    metric = REGISTRY._register(Histogram(name, help_text, labels, buckets))
    assert isinstance(metric, Histogram)
    return metric


# The shared metrics every daemon updates. ``protocol`` is one of smtp, submission,
# imap, pop3, http, websocket.
CONNECTIONS = gauge("shardmail_connections", "Open client connections.", ["protocol"])
CONNECTIONS_TOTAL = counter(
    "shardmail_connections_total", "Client connections accepted.", ["protocol"]
)
CONNECTIONS_REFUSED = counter(
    "shardmail_connections_refused_total",
    "Connections refused because their client IP had too many open.",
    ["protocol"],
)
MESSAGES_RECEIVED = counter(
    "shardmail_messages_received_total",
    "Messages accepted from clients (SMTP end of data, HTTP send, IMAP APPEND).",
    ["protocol"],
)
MESSAGES_DELIVERED = counter(
    "shardmail_messages_delivered_total",
    "Messages delivered: local ingest or remote 250.",
    ["destination"],  # local | remote
)
MESSAGES_QUEUED = counter(
    "shardmail_messages_queued_total", "Recipients put on the outbound queue."
)
MESSAGES_BOUNCED = counter(
    "shardmail_messages_bounced_total", "Recipients failed permanently (a DSN was sent)."
)
OUTBOUND_HELD = counter(
    "shardmail_outbound_held_total",
    "Submitted messages queued held because their account is over a sending limit.",
    ["limit"],  # messages_per_hour | ... | flagged (the account was already limited)
)
AUTH_FAILURES = counter(
    "shardmail_auth_failures_total", "Failed authentication attempts.", ["protocol"]
)
COMMAND_LATENCY = histogram(
    "shardmail_command_duration_seconds",
    "Time to answer one protocol command or HTTP request.",
    ["protocol", "command"],
)
