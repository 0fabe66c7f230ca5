"""A bounded on-disk metrics history, because the services' ``/metrics`` only show current values.

Every ``interval_s`` (10 s by default) the sampler scrapes each service's ``/metrics``, keeps only the samples
``rtml report`` draws (``RECORDED``: HTTP traffic and latency, ingest events, features freshness, consumer
lag, model quality; health, readiness and metrics routes left out) and appends one JSON line per service to
``DIR/<service>.jsonl``::

    {"t": 1732874000.123, "service": "serving", "s": [["rtml_http_requests_total", {"route": ...}, 42.0], ...]}

A file that grows past ``max_bytes`` is renamed to ``<service>.jsonl.1`` (replacing the previous one), so the
history never takes more than 2 x ``max_bytes`` per service (defaults: 4 MiB, several hours of ``rtml up
--demo`` at 10 s). ``rtml up`` runs one in a thread (``RUN_DIR/metrics``); ``rtml report --record`` runs one
in the foreground against any platform. Cost: four small GETs and parses every 10 s.

Parsing is prometheus_client's own parser, as everywhere else in rtml.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
from prometheus_client.parser import text_string_to_metric_families

from rtml.core.settings import SERVICES, Settings

log = logging.getLogger(__name__)

INTERVAL_S = 10.0
MAX_BYTES = 4 * 1024 * 1024
SCRAPE_TIMEOUT_S = 2.0
# Sample names kept (histograms: their buckets; ``_sum``/``_count`` are implied by the +Inf bucket).
RECORDED = frozenset({
    "rtml_http_requests_total",
    "rtml_http_request_duration_seconds_bucket",
    "rtml_ingest_events_total",
    "rtml_features_freshness_seconds_bucket",
    "rtml_consumer_lag_records",
    "rtml_predictions_total",
    "rtml_model_quality",
})  # fmt: skip
QUALITY_METRICS = frozenset({"auc", "log_loss", "count"})
SKIPPED_ROUTES = frozenset({"/healthz", "/readyz", "/metrics"})
Sample = tuple[str, dict[str, str], float]


def service_urls(settings: Settings) -> dict[str, str]:
    """Each service's base URL as a client on this machine reaches it."""
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "") else settings.host  # noqa: S104 - a client address
    return {name: f"http://{host}:{settings.port_of(name)}" for name in SERVICES}


def select_samples(text: str) -> list[Sample]:
    """The samples of Prometheus ``text`` the report uses (see ``RECORDED``), NaN gauges left out."""
    out: list[Sample] = []
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name not in RECORDED or s.value != s.value:  # NaN: a measurement with nothing to measure
                continue
            if s.labels.get("route") in SKIPPED_ROUTES:
                continue
            if s.name == "rtml_model_quality" and s.labels.get("metric") not in QUALITY_METRICS:
                continue
            out.append((s.name, dict(s.labels), float(s.value)))
    return out


def history_files(directory: Path, service: str) -> list[Path]:
    """Oldest first: the rotated file, then the current one (those that exist)."""
    return [p for p in (directory / f"{service}.jsonl.1", directory / f"{service}.jsonl") if p.is_file()]


@dataclass
class Snapshot:
    t: float
    service: str
    samples: list[Sample]


@dataclass
class History:
    """Snapshots per service, oldest first, and how many lines could not be read (a torn last write)."""

    snapshots: dict[str, list[Snapshot]] = field(default_factory=dict)
    unreadable: int = 0

    def __len__(self) -> int:
        return sum(len(v) for v in self.snapshots.values())

    def span(self) -> tuple[float, float] | None:
        times = [s.t for snaps in self.snapshots.values() for s in snaps]
        return (min(times), max(times)) if times else None


def _lines(paths: Iterable[Path]) -> Iterator[bytes]:
    for path in paths:
        with contextlib.suppress(FileNotFoundError), path.open("rb") as f:  # rotated away while reading: gone
            yield from f


def load_history(directory: Path, since: float | None = None, until: float | None = None) -> History:
    """Every snapshot in ``directory`` with ``since <= t <= until`` (epoch seconds), per service."""
    history = History()
    for service in SERVICES:
        snaps: list[Snapshot] = []
        for line in _lines(history_files(directory, service)):
            if not line.strip():
                continue
            try:
                doc = orjson.loads(line)
                t = float(doc["t"])
                samples = [(str(n), {str(k): str(v) for k, v in labels.items()}, float(v)) for n, labels, v in doc["s"]]
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
                history.unreadable += 1
                continue
            if (since is None or t >= since) and (until is None or t <= until):
                snaps.append(Snapshot(t, service, samples))
        if snaps:
            snaps.sort(key=lambda s: s.t)
            history.snapshots[service] = snaps
    return history


class Sampler:
    """Scrapes ``targets`` (service -> base URL) every ``interval_s`` into ``directory``; see the module doc."""

    def __init__(
        self,
        targets: Mapping[str, str],
        directory: Path,
        *,
        interval_s: float = INTERVAL_S,
        max_bytes: int = MAX_BYTES,
        timeout_s: float = SCRAPE_TIMEOUT_S,
    ) -> None:
        if interval_s <= 0 or max_bytes <= 0:
            raise ValueError("the sampler needs a positive interval and size bound")
        self.targets = dict(targets)
        self.directory = directory
        self.interval_s = interval_s
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.failures: dict[str, str] = {}  # service -> the last scrape error (cleared by a good scrape)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def for_settings(cls, settings: Settings, directory: Path, **kwargs: Any) -> Sampler:
        return cls(service_urls(settings), directory, **kwargs)

    def write(self, service: str, t: float, samples: list[Sample]) -> None:
        """Append one snapshot of ``service`` (rotating first when the file would pass ``max_bytes``)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        line = orjson.dumps({"t": round(t, 3), "service": service, "s": samples}) + b"\n"
        path = self.directory / f"{service}.jsonl"
        with contextlib.suppress(FileNotFoundError):
            if path.stat().st_size + len(line) > self.max_bytes:
                path.replace(self.directory / f"{service}.jsonl.1")
        with path.open("ab") as f:  # one write per line: O_APPEND keeps concurrent samplers' lines whole
            f.write(line)

    def sample_once(self, client: httpx.Client) -> dict[str, bool]:
        """Scrape every target once and append what it answered; service -> whether it answered."""
        ok: dict[str, bool] = {}
        for service, url in self.targets.items():
            try:
                r = client.get(f"{url}/metrics")
                r.raise_for_status()
                t = time.time()
                samples = select_samples(r.text)
            except (httpx.HTTPError, ValueError) as exc:  # down, or not Prometheus text: nothing to record
                self.failures[service] = f"{type(exc).__name__}: {exc}"
                ok[service] = False
                continue
            self.failures.pop(service, None)
            self.write(service, t, samples)
            ok[service] = True
        return ok

    def run(self, stop: threading.Event | None = None) -> None:
        """Sample until ``stop`` (or :meth:`stop`) is set; a full disk or a bad directory is logged, not fatal
        to the caller (``rtml up`` must not die because its history cannot be written)."""
        stop = stop or self._stop
        with httpx.Client(timeout=self.timeout_s) as client:
            while True:
                started = time.monotonic()
                try:
                    self.sample_once(client)
                except OSError as exc:
                    log.warning("metrics history: cannot write to %s: %s", self.directory, exc)
                if stop.wait(max(0.0, self.interval_s - (time.monotonic() - started))) or self._stop.is_set():
                    return

    def start(self) -> Sampler:
        """Run in a daemon thread (it never keeps a process alive); :meth:`stop` ends it."""
        self._thread = threading.Thread(target=self.run, name="rtml-metrics-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 1.0) -> None:
        """Ask the thread to end and wait up to ``timeout_s`` (a daemon: a scrape still hanging dies with us)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
