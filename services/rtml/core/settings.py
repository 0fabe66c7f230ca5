"""The one settings object of rtml.

Every setting is an environment variable prefixed ``RTML_`` (also read from ``.env``). Nested groups use a
single underscore after the group name, so ``RTML_KAFKA_BOOTSTRAP`` sets ``settings.kafka.bootstrap`` and
``RTML_REDIS_URL`` sets ``settings.redis.url`` exactly as the contract names them.
Settings are frozen once built: pass them around, never read ``os.environ`` elsewhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from rtml.core.timeutil import Duration

ServiceName = Literal["ingest", "features", "serving", "feedback"]
SERVICES: tuple[ServiceName, ...] = ("ingest", "features", "serving", "feedback")


class KafkaSettings(BaseModel):
    """Kafka client options. SASL/SSL pass straight through to aiokafka for real clusters."""

    model_config = ConfigDict(frozen=True)

    bootstrap: str | None = None
    client_id: str = "rtml"
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: str | None = None  # PLAIN, SCRAM-SHA-256, SCRAM-SHA-512
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    # Tansu (the embedded broker) rejects the idempotent producer; turn it on for Apache Kafka.
    enable_idempotence: bool = False
    linger_ms: int = 2
    request_timeout_ms: int = 10_000
    # How long a publish may wait for the broker before ingest answers 503.
    publish_timeout_s: float = 5.0
    # Low fetch wait: Tansu (unlike Apache Kafka) answers a fetch only when the wait is over, even when records
    # arrive meanwhile, so the default 500 ms adds ~115 ms per hop there (measured). Consumers that need no
    # low latency (serving's promotions, feedback) override it.
    fetch_max_wait_ms: int = 10
    session_timeout_ms: int = 6_000
    heartbeat_interval_ms: int = 1_000
    max_poll_records: int = 2_000
    partitions: int = 4
    replication_factor: int = 1
    # How often each consumer asks the broker for its partitions' end offsets, for rtml_consumer_lag_records
    # (between asks the lag follows every fetch and commit). RTML_KAFKA_LAG_INTERVAL_S.
    lag_interval_s: float = Field(default=5.0, gt=0)


class RedisSettings(BaseModel):
    model_config = ConfigDict(frozen=True)

    url: str | None = None
    # Every key starts with this; tests use a random one per test so they never collide.
    key_prefix: str = "rtml:"
    # Redis Cluster: group each Lua call's keys by hash slot (single node: any entities share a call).
    cluster: bool = False
    max_connections: int = 64
    socket_timeout_s: float = 2.0


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="RTML_",
        env_file=".env",
        env_file_encoding="utf-8",
        env_nested_delimiter="_",
        env_nested_max_split=1,
        extra="ignore",
        frozen=True,
    )

    kafka: KafkaSettings = KafkaSettings()
    redis: RedisSettings = RedisSettings()

    config: Path | None = Field(default=None, description="Path of rtml.yaml")
    topic_prefix: str = "rtml."
    api_keys: SecretStr | None = None
    log_level: str = "INFO"

    host: str = "127.0.0.1"
    # After SIGTERM/SIGINT, how long requests in flight may take to finish before they are cut (then consumers
    # commit and the producer flushes). Keep it under the orchestrator's kill timeout (`rtml up`: 5 s; Kubernetes
    # terminationGracePeriodSeconds: 30 s by default).
    shutdown_grace_s: float = Field(default=4.0, gt=0)
    # uvicorn worker processes per service (`rtml serve`); more than 1 turns on prometheus-client's
    # multiprocess mode so /metrics counts every worker (see rtml.core.metrics).
    workers: int = Field(default=1, ge=1)
    ingest_port: int = 8001
    features_port: int = 8002
    serving_port: int = 8003
    feedback_port: int = 8004

    # Duplicates (same event_id) count once within this horizon; never shorter than the longest window.
    dedup_horizon: Duration = Field(default=24 * 3600 * 1000, description="ms; accepts 24h, 90m, 3600s")
    # Events with a ts further than this in the future are rejected by ingest.
    max_future_s: int = 300
    max_batch_events: int = 10_000
    max_body_bytes: int = 10 * 1024 * 1024

    # serving
    model_poll_interval_s: float = 1.0  # fallback to the promotions announced on the models topic
    prediction_log_buffer: int = 10_000
    # The budget of one predict/recommend request unless it sends X-Request-Timeout-Ms: a feature read
    # that cannot finish within it is abandoned and the answer uses defaults, with degraded: true.
    predict_timeout_ms: int = Field(default=50, ge=1, le=60_000)
    # predict/recommend requests in flight per process; one more is refused at once (503), not queued.
    predict_max_in_flight: int = Field(default=64, ge=1)
    # ingest admission, per process: POST /v1/events requests in flight (reading, validating or waiting for
    # the broker's acks); one more is refused at once (503 overloaded + Retry-After), before its body is read.
    ingest_max_in_flight: int = Field(default=64, ge=1)
    # ingest admission, per process: events waiting for the broker's acks; a request whose events would take
    # more is refused the same way (one request is always admitted when nothing is pending, whatever its size).
    ingest_max_pending_events: int = Field(default=200_000, ge=1)
    # overload of the process itself (rtml.core.looplag): when > 0, the event loop's lag caps the requests a
    # process has in flight (each 5 ms tick this far late while the loop's thread is busy halves the cap from
    # what was in flight; each tick on time adds one back), and predict, recommend and ingest requests past the
    # cap are refused at once (503 overloaded + Retry-After), so refusals stay fast when the CPU, not a
    # dependency, is the bottleneck. Off (0) by default: it also refuses a little of the bursts a process near
    # its capacity would only have queued (docs/reliability.md#overload). The lag is exported either way.
    max_loop_lag_ms: float = Field(default=0.0, ge=0)
    # feedback: how long a prediction waits for its outcome (and an outcome for its prediction)
    join_ttl: Duration = 3600 * 1000
    # feedback, label rules: a prediction whose rule window has passed waits this much longer for events
    # still in flight (ingest -> Kafka -> feedback) before it gets the rule's negative label.
    label_grace: Duration = 60 * 1000
    # feedback, examples store: Parquet files partitioned by model and day. Several feedback replicas need
    # it on shared storage (file names carry partition and offsets, so writers never collide).
    examples_dir: Path = Path(".rtml/examples")
    examples_flush_rows: int = Field(default=10_000, ge=1)  # a file is written after this many examples
    examples_flush_s: float = Field(default=10.0, gt=0)  # ... or this long after the first one buffered
    # feedback, learning loop: how often quality gauges, retraining triggers and rollout decisions are checked
    learning_interval_s: float = Field(default=5.0, gt=0)

    @field_validator("max_loop_lag_ms")
    @classmethod
    def _lag_above_timer_resolution(cls, value: float) -> float:
        if 0 < value < 1:  # uvloop's timers count whole ms: below that nearly every tick would look late
            raise ValueError("must be 0 (off) or at least 1 ms")
        return value

    def port_of(self, service: ServiceName) -> int:
        return int(getattr(self, f"{service}_port"))

    def topic(self, name: str) -> str:
        return f"{self.topic_prefix}{name}"

    def platform_config_path(self) -> Path:
        """`RTML_CONFIG`, else ./rtml.yaml, else the bundled demo config."""
        if self.config is not None:
            return self.config
        local = Path("rtml.yaml")
        if local.is_file():
            return local
        return Path(__file__).resolve().parent.parent / "demo" / "rtml.yaml"


def load_settings(**overrides: object) -> Settings:
    """Build settings from the environment, with explicit overrides (tests, the CLI) on top."""
    return Settings(**overrides)  # type: ignore[arg-type]
