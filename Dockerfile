# One image for the four services; the command picks one: `rtml serve ingest|features|serving|feedback`
# (also `rtml train --if-none-live`, `rtml simulate ...`: every rtml command works in it).
# Build: docker build -t rtml:0.1.0 .    Run: docker run --rm -e RTML_KAFKA_BOOTSTRAP=... -e RTML_REDIS_URL=...
#        -p 8003:8003 rtml:0.1.0 serve serving
# Nothing is downloaded at run time: the package, its dependencies and the bundled demo config are in the image.
# The embedded broker and redis-server (the `embedded` extra, for `rtml up`) are not: containers use real ones.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
# A virtual environment copies cleanly into the runtime stage (same base image, same interpreter path).
RUN python -m venv /opt/rtml
WORKDIR /src
COPY pyproject.toml README.md ./
COPY services ./services
# Every dependency ships manylinux wheels: no compiler needed; the smoke test fails the build on a broken install.
RUN /opt/rtml/bin/pip install . \
    && /opt/rtml/bin/rtml --help >/dev/null

FROM ${PYTHON_IMAGE}
# A fixed numeric uid/gid, so Kubernetes' runAsNonRoot can verify it; /var/lib/rtml holds the examples store
# (a named volume mounted there inherits this ownership).
RUN groupadd --gid 10001 rtml \
    && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/rtml --shell /usr/sbin/nologin rtml \
    && mkdir -p /var/lib/rtml/examples \
    && chown -R 10001:10001 /var/lib/rtml
COPY --from=build /opt/rtml /opt/rtml
ENV PATH=/opt/rtml/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    RTML_HOST=0.0.0.0 \
    RTML_EXAMPLES_DIR=/var/lib/rtml/examples
USER 10001:10001
WORKDIR /home/rtml
EXPOSE 8001 8002 8003 8004
# Liveness of whichever service this container runs: find the `rtml serve NAME` process, ask rtml's own
# settings for its port (so RTML_<NAME>_PORT and .env are honoured) and GET /healthz. A container running
# another command (train, simulate) has no server: nothing to check. Compose and Kubernetes define their own
# probes (/readyz for readiness); this one serves a plain `docker run`.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 CMD ["python", "-c", "import glob, sys, urllib.request\nfrom rtml.core.settings import SERVICES, load_settings\nname = None\nfor path in glob.glob('/proc/[0-9]*/cmdline'):\n    try:\n        argv = [a.decode() for a in open(path, 'rb').read().split(b'\\0')]\n    except OSError:\n        continue\n    for i, arg in enumerate(argv[:-1]):\n        if arg == 'serve' and argv[i + 1] in SERVICES:\n            name = argv[i + 1]\nif name is None:\n    sys.exit(0)\nurllib.request.urlopen(f'http://127.0.0.1:{load_settings().port_of(name)}/healthz', timeout=4)\n"]
ENTRYPOINT ["rtml"]
CMD ["serve", "ingest"]
