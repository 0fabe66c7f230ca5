"""``rtml bench predict --plot``: a short real run (serving app + the shipped baseline) drawn into a PNG."""

from __future__ import annotations

import asyncio
import io
import os
import sys
from pathlib import Path

import orjson
import pytest

from rtml.core.settings import Settings
from tests.helpers import png_size

pytestmark = pytest.mark.integration


def client_env(s: Settings) -> dict[str, str]:
    """What a second terminal would have: the fixture's broker, Redis, prefixes and serving port."""
    return {
        **os.environ,
        "RTML_KAFKA_BOOTSTRAP": str(s.kafka.bootstrap),
        "RTML_REDIS_URL": str(s.redis.url),
        "RTML_REDIS_KEY_PREFIX": s.redis.key_prefix,
        "RTML_TOPIC_PREFIX": s.topic_prefix,
        "RTML_SERVING_PORT": str(s.serving_port),
        "RTML_CONFIG": str(s.config),
    }


async def test_bench_predict_plot_is_a_png_of_the_run(serving: Settings, tmp_path: Path) -> None:
    plot, out = tmp_path / "predict.png", tmp_path / "predict.json"
    # a subprocess, as a user runs it: the serving app keeps answering in this test's event loop meanwhile
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "rtml.cli.main", "bench", "predict", "--duration", "2", "--repeats", "1",
        "--concurrency", "1", "--concurrency", "2", "--client", "raw", "--plot", str(plot), "--out", str(out),
        env=client_env(serving), cwd=tmp_path, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    stdout, stderr = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, stderr.decode()[-2000:]
    summary = orjson.loads(stdout)
    assert [lv["concurrency"] for lv in summary["levels"]] == [1, 2]
    assert f"plot written to {plot}" in stderr.decode().replace("\n", "")
    data = plot.read_bytes()
    assert png_size(data) == (1400, 560)

    from matplotlib.image import imread

    pixels = imread(io.BytesIO(data), format="png")
    assert pixels.shape[:2] == (560, 1400)
    assert len({tuple(p) for p in pixels.reshape(-1, pixels.shape[-1])[::53].tolist()}) > 10  # not blank
