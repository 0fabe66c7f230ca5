"""``rtml up``: the whole platform on one machine, in the foreground, stopped cleanly by Ctrl-C/SIGTERM.

Order: infra (embedded broker and redis-server unless their variables are set) -> topics -> every configured
model without a live version trained and promoted -> the four services as separate processes, each waited
for on ``/readyz`` -> (``--demo``) the simulators. Shutdown runs the other way round within 10 s: simulators
(1 s), services (SIGTERM, SIGKILL after 5 s), infra (SIGTERM, SIGKILL after 1.5 s). A service that dies is
reported and ends ``up`` with exit 1.

Replicas (``--replicas N``, default 1): N processes of every service. All four scale that way: ingest,
serving and feedback keep no state of their own (Kafka and Redis hold it), and the features replicas are
members of one consumer group that splits the topic's partitions between them (more members than partitions
leaves the extra ones idle). Replica ``i`` (0-based) of a service listens on ``RTML_<SERVICE>_PORT + i *
--port-step`` (default step 10: ingest 8001, 8011, 8021…; features 8002, 8012…), so replica 0 is where one
replica would be. Every port is checked before anything starts: a taken or clashing one is one clear error.

Output: one line ``NAME URL`` per process: with N = 1 exactly the four lines it always printed; with N > 1
replica 0 of each service first (the same four lines), then replica 1 of each, and so on, so the i-th line
naming a service is its replica i. Then ``kafka``, ``redis`` and ``logs`` lines. The endpoints file
(``.rtml/endpoints.env``) keeps ``RTML_<SERVICE>_PORT`` = replica 0 (what client commands use) and adds
``RTML_<SERVICE>_URLS`` = every replica's URL, comma-separated, in replica order. Logs: ``logs/NAME.log``
with N = 1, ``logs/NAME.I.log`` per replica otherwise. A load balancer in front of the replicas: round robin
for all four (see the scaling notes); nothing needs stickiness.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import httpx
import typer

from rtml.cli.common import ENDPOINTS_FILE, CliError, err, load_settings, quiet_logging, run
from rtml.cli.train import ensure_live_models
from rtml.core import embedded
from rtml.core.kafka import create_topics
from rtml.core.settings import SERVICES, ServiceName, Settings
from rtml.report.history import Sampler

READY_TIMEOUT_S = 90.0
SIMULATOR_STOP_S = 1.0
SERVICE_STOP_S = 5.0
INFRA_STOP_S = 1.5
DEFAULT_PORT_STEP = 10


async def _prepare(settings: Settings) -> list[str]:
    await create_topics(settings)
    return await ensure_live_models(settings)


def prepare(settings: Settings) -> list[str]:
    """Create the topics and train and promote every configured model (``ctr`` and ``fraud`` in the demo
    config) that has no live version; one line per model. No announcement: the services start after this."""
    return run(_prepare(settings), settings)


class Child:
    """A process ``up`` started (a service or a simulator), logging to its own file."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        with open(self.log_path, "wb") as log:
            # Own session: the terminal's Ctrl-C reaches only ``up``, which stops children in order.
            self.proc = subprocess.Popen(  # noqa: S603 - our own interpreter and module
                argv, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def terminate(self) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)

    def wait_or_kill(self, deadline: float) -> None:
        try:
            self.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            err.print(f"{self.name} did not stop in time; killed")
            self.proc.kill()
            self.proc.wait()


def rtml_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "rtml.cli.main", *args]


def service_url(settings: Settings, name: ServiceName, port: int | None = None) -> str:
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "") else settings.host  # noqa: S104 - a client address
    return f"http://{host}:{settings.port_of(name) if port is None else port}"


class Replica:
    """One process of a service as planned: which service, which replica, on which port."""

    def __init__(self, service: ServiceName, index: int, port: int, of: int) -> None:
        self.service, self.index, self.port = service, index, port
        # N = 1: the names (and log files) of old; N > 1: ingest.0, ingest.1, …
        self.name = service if of == 1 else f"{service}.{index}"


def plan_replicas(settings: Settings, replicas: int, port_step: int = DEFAULT_PORT_STEP) -> list[Replica]:
    """Every service process ``up`` starts, replica 0 of each service first: replica ``i`` of a service on
    ``RTML_<SERVICE>_PORT + i * port_step``. Raises ``CliError`` when two planned ports are the same or one
    is out of range (checking that they are free is ``check_ports``)."""
    if replicas < 1:
        raise CliError(f"--replicas must be at least 1, not {replicas}")
    plan = [Replica(name, i, settings.port_of(name) + i * port_step, replicas)
            for i in range(replicas) for name in SERVICES]  # fmt: skip
    seen: dict[int, Replica] = {}
    for r in plan:
        if not 0 < r.port < 65536:
            raise CliError(
                f"{r.name} would listen on port {r.port}, out of range; "
                f"lower RTML_{r.service.upper()}_PORT, --replicas or --port-step"
            )
        if r.port in seen:
            raise CliError(f"{r.name} and {seen[r.port].name} would both listen on port {r.port}; set the "
                           "RTML_<SERVICE>_PORT values or --port-step so that base + i * step never meet")  # fmt: skip
        seen[r.port] = r
    return plan


def check_ports(host: str, plan: list[Replica]) -> None:
    """A clear error for the first planned port something else already listens on, before anything starts.
    Binds like uvicorn does (SO_REUSEADDR), so a port in TIME_WAIT from a previous run does not count."""
    for r in plan:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, r.port))
            except OSError as exc:
                raise CliError(
                    f"port {r.port} on {host} is taken ({exc.strerror}); {r.name} cannot listen there: "
                    f"stop what uses it or set RTML_{r.service.upper()}_PORT"
                ) from None


class Platform:
    """Everything ``up`` starts, so that whatever happened, ``shutdown`` stops exactly that."""

    def __init__(
        self,
        settings: Settings,
        log_dir: Path,
        stop: threading.Event,
        replicas: int = 1,
        port_step: int = DEFAULT_PORT_STEP,
    ) -> None:
        self.settings = settings
        self.log_dir = log_dir
        self.stop = stop
        self.plan = plan_replicas(settings, replicas, port_step)
        self.replica_of: dict[str, Replica] = {r.name: r for r in self.plan}
        self.infra: list[embedded.Managed] = []
        self.services: list[Child] = []
        self.simulators: list[Child] = []
        self.env: dict[str, str] = dict(os.environ)
        self.endpoints_file = log_dir.parent / ENDPOINTS_FILE.name

    # -- start ------------------------------------------------------------------------------------------
    def start_infra(self) -> None:
        s = self.settings
        bootstrap, redis_url = s.kafka.bootstrap, s.redis.url
        if not bootstrap:
            with err.status("starting the embedded Kafka-protocol broker…"):
                broker = embedded.start_broker(9092, self.log_dir)
            self.infra.append(broker)
            bootstrap = f"127.0.0.1:{broker.port}"
        if not redis_url:
            with err.status("starting redis-server…"):
                server = embedded.start_redis(6379, self.log_dir)
            self.infra.append(server)
            redis_url = f"redis://127.0.0.1:{server.port}/0"
        self.env["RTML_KAFKA_BOOTSTRAP"], self.env["RTML_REDIS_URL"] = bootstrap, redis_url
        self.settings = s.model_copy(
            update={
                "kafka": s.kafka.model_copy(update={"bootstrap": bootstrap}),
                "redis": s.redis.model_copy(update={"url": redis_url}),
            }
        )

    def write_endpoints(self) -> None:
        """Tell client commands started from the same directory (``rtml bench``, ``simulate``, ``train``,
        ``models``) where this platform is; see ``rtml.cli.common.load_client_settings``."""
        s = self.settings
        values = {"RTML_KAFKA_BOOTSTRAP": s.kafka.bootstrap, "RTML_REDIS_URL": s.redis.url,
                  "RTML_TOPIC_PREFIX": s.topic_prefix, "RTML_REDIS_KEY_PREFIX": s.redis.key_prefix,
                  "RTML_HOST": s.host, **{f"RTML_{n.upper()}_PORT": str(s.port_of(n)) for n in SERVICES},
                  **{f"RTML_{n.upper()}_URLS": ",".join(self.urls(n)) for n in SERVICES}}  # fmt: skip
        text = "".join(f"{k}={v}\n" for k, v in values.items() if v is not None)
        with contextlib.suppress(OSError):
            self.endpoints_file.write_text("# written by rtml up while it runs\n" + text)

    def prepare(self) -> None:
        with err.status("creating topics, checking the models…"):
            lines = prepare(self.settings)
        for line in lines:
            err.print(line)

    def urls(self, service: ServiceName) -> list[str]:
        """Every replica's URL of ``service``, in replica order."""
        return [service_url(self.settings, r.service, r.port) for r in self.plan if r.service == service]

    def url_of(self, child: Child) -> str:
        r = self.replica_of[child.name]
        return service_url(self.settings, r.service, r.port)

    def check_ports(self) -> None:
        check_ports(self.settings.host, self.plan)

    def start_services(self) -> None:
        parent = str(os.getpid())
        for r in self.plan:
            argv = rtml_argv("serve", r.service, "--parent-pid", parent)
            env = {**self.env, f"RTML_{r.service.upper()}_PORT": str(r.port)}
            self.services.append(Child(r.name, argv, env, self.log_dir))

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> bool:
        """True once every service answers ``/readyz`` 200; False if asked to stop first."""
        deadline = time.monotonic() + timeout_s
        pending = {c.name: c for c in self.services}
        with httpx.Client(timeout=1.0) as client, err.status("starting services…") as status:
            while pending:
                for name, child in list(pending.items()):
                    if not child.alive():
                        raise CliError(
                            f"{name} exited with code {child.proc.returncode} while starting; see {child.log_path}"
                        )
                    url = self.url_of(child)
                    with contextlib.suppress(httpx.HTTPError):
                        if client.get(f"{url}/readyz").status_code == 200:
                            del pending[name]
                status.update(f"starting services… waiting for {', '.join(pending) or 'none'}")
                if not pending:
                    break
                if time.monotonic() > deadline:
                    name, child = next(iter(pending.items()))
                    raise CliError(f"{name} is not ready after {timeout_s:.0f} s (GET /readyz); see {child.log_path}")
                if self.stop.wait(0.2):
                    return False
        return True

    def announce(self) -> None:
        """One line per service process (replica 0 of each service first, see the module docstring), then
        broker, redis and logs: stdout, for people and scripts alike."""
        started = {m.name for m in self.infra}
        lines = [f"{r.service:<9} {service_url(self.settings, r.service, r.port)}" for r in self.plan]
        lines.append(f"{'kafka':<9} {self.settings.kafka.bootstrap}{' (embedded)' if 'broker' in started else ''}")
        lines.append(f"{'redis':<9} {self.settings.redis.url}{' (embedded)' if 'redis' in started else ''}")
        lines.append(f"{'logs':<9} {self.log_dir}")
        print("\n".join(lines), flush=True)

    def start_simulators(self) -> None:
        self.simulators = [
            # --score-purchases: serving scores each purchase with fraud, so chargebacks label fraud too
            Child("simulate", rtml_argv("simulate", "--via", "http", "--rate", "50", "--duration", "0",
                                        "--keep-going", "--score-purchases"), self.env, self.log_dir),
            # 5 rounds/s of 3 shown items: 15 labels/s, so a model's windowed quality rests on 500+ labels
            # (what the quality-drop alert waits for) within a minute or so of labels arriving
            Child("outcomes", rtml_argv("simulate-outcomes", "--rate", "5"), self.env, self.log_dir),
        ]  # fmt: skip
        err.print(
            "demo: clickstream at 50 events/s (each purchase scored by fraud) and outcomes at 5 recommendation rounds/s"
        )

    # -- run --------------------------------------------------------------------------------------------
    def watch(self) -> int:
        """Until asked to stop: 0. A service or infra process that dies: report it, 1."""
        reported: set[str] = set()
        while not self.stop.wait(0.25):
            for c in self.services:
                if not c.alive():
                    err.print(f"rtml: {c.name} exited with code {c.proc.returncode}; see {c.log_path}")
                    return 1
            for m in self.infra:
                if m.proc.poll() is not None:
                    where = f"; see {m.log_path}" if m.log_path else ""
                    err.print(f"rtml: embedded {m.name} exited with code {m.proc.returncode}{where}")
                    return 1
            for c in self.simulators:
                if not c.alive() and c.name not in reported:
                    reported.add(c.name)
                    err.print(f"demo {c.name} simulator exited with code {c.proc.returncode}; see {c.log_path}")
        return 0

    # -- stop -------------------------------------------------------------------------------------------
    def shutdown(self) -> None:
        if not (self.simulators or self.services or self.infra):
            return
        with err.status("stopping…"):
            for group, budget in ((self.simulators, SIMULATOR_STOP_S), (self.services, SERVICE_STOP_S)):
                for c in group:
                    c.terminate()
                deadline = time.monotonic() + budget
                for c in group:
                    c.wait_or_kill(deadline)
            for m in self.infra:
                if m.proc.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        m.proc.send_signal(signal.SIGTERM)
            for m in reversed(self.infra):
                m.stop(timeout_s=INFRA_STOP_S)
            with contextlib.suppress(OSError):
                self.endpoints_file.unlink(missing_ok=True)
        err.print("stopped")


def _install_signal_handlers(stop: threading.Event) -> Callable[[], None]:
    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous: dict[int, Any] = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    return restore


def up(
    demo: bool = typer.Option(False, "--demo", help="also run the clickstream and outcome simulators"),
    no_embedded: bool = typer.Option(
        False,
        "--no-embedded",
        help="never start the embedded broker or Redis (RTML_KAFKA_BOOTSTRAP and RTML_REDIS_URL must be set)",
    ),
    run_dir: Path = typer.Option(Path(".rtml"), help="where the children's logs go (RUN_DIR/logs)"),  # noqa: B008
    replicas: int = typer.Option(
        1, "--replicas", min=1, help="processes of each service; replica i listens on RTML_<SERVICE>_PORT + i * step"
    ),
    port_step: int = typer.Option(
        DEFAULT_PORT_STEP, "--port-step", min=1, help="port distance between two replicas of one service"
    ),
) -> None:
    """The whole platform on this machine: broker, Redis, the four services (and simulators with --demo).

    With --replicas N, N processes of each service, each on its own port (see ``rtml.cli.up``)."""
    settings = load_settings()
    quiet_logging()
    missing = [v for v, set_ in (("RTML_KAFKA_BOOTSTRAP", settings.kafka.bootstrap),
                                 ("RTML_REDIS_URL", settings.redis.url)) if not set_]  # fmt: skip
    if no_embedded and missing:
        raise CliError(f"--no-embedded needs {' and '.join(missing)} to be set")
    log_dir = (run_dir / "logs").resolve()
    try:
        log_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CliError(f"cannot create the log directory {log_dir}: {exc.strerror}") from None

    platform = Platform(settings, log_dir, threading.Event(), replicas, port_step)
    platform.check_ports()  # before the broker and models: a taken port fails at once, nothing to undo
    stop = platform.stop
    restore = _install_signal_handlers(stop)
    code = 0
    sampler = None
    try:
        platform.start_infra()
        if not stop.is_set():
            platform.prepare()
        if not stop.is_set():
            platform.start_services()
            if platform.wait_ready():
                platform.write_endpoints()
                platform.announce()
                # metrics history for `rtml report` (rtml.report.history): one scrape per service every 10 s
                sampler = Sampler.for_settings(platform.settings, log_dir.parent / "metrics").start()
                if demo:
                    platform.start_simulators()
                code = platform.watch()
    finally:
        if sampler is not None:
            sampler.stop()
        platform.shutdown()
        restore()
    if code:
        raise typer.Exit(code)
