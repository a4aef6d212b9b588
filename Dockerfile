# syntax=docker/dockerfile:1
#
# Vienna sidecar image.
#
#   docker build -t vienna-sidecar .
#   docker run --rm -p 8080:8080 -p 9090:9090 --read-only --tmpfs /tmp \
#       -v vienna-data:/var/lib/vienna vienna-sidecar
#
# Two stages: the builder turns the source tree into one wheel; the final image installs that wheel
# (and its dependencies from the package index) and nothing else from the source tree.
# The image runs as uid/gid 10001 and works with a read-only root filesystem: the only writable
# paths it needs are the data dir (/var/lib/vienna: audit db, CA private key, generated keys; a
# volume, SECRET, never shared with the agent) and /tmp (mount a tmpfs / emptyDir there).

ARG PYTHON_VERSION=3.12

# ---- builder: source tree -> /dist/vienna_sidecar-*.whl -------------------------------------------
FROM python:${PYTHON_VERSION}-slim AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY policy/ ./policy/
COPY proxy/ ./proxy/
RUN pip wheel --no-deps -w /dist .

# ---- final: the wheel only ------------------------------------------------------------------------
FROM python:${PYTHON_VERSION}-slim

LABEL org.opencontainers.image.title="vienna-sidecar" \
      org.opencontainers.image.description="Egress enforcement proxy for AI agents: risk tiers, operator-approved warrants, tamper-evident audit." \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

# The wheel is bind-mounted from the builder for this one step, so it never becomes a layer of the
# final image; pip compiles the bytecode now, since nothing can write it under a read-only root fs.
RUN --mount=type=bind,from=builder,source=/dist,target=/dist \
    pip install --no-cache-dir /dist/*.whl \
 && groupadd --system --gid 10001 vienna \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/vienna --no-create-home \
        --shell /usr/sbin/nologin vienna \
 && mkdir -p /var/lib/vienna \
 && chown 10001:10001 /var/lib/vienna \
 && chmod 0700 /var/lib/vienna

# Listen on all interfaces inside the container; the Helm chart narrows the proxy to 127.0.0.1 in
# regular (explicit proxy) mode. Every flag of `vienna run` can be set as VIENNA_<FLAG>.
ENV HOME=/var/lib/vienna \
    VIENNA_LISTEN=0.0.0.0:8080 \
    VIENNA_API=0.0.0.0:9090 \
    VIENNA_DATA_DIR=/var/lib/vienna

WORKDIR /var/lib/vienna
VOLUME ["/var/lib/vienna"]

USER 10001:10001

# 8080: the proxy (data plane); 9090: the control API (/healthz, /readyz, /metrics, /v1/...).
EXPOSE 8080 9090

HEALTHCHECK --interval=30s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; port = os.environ.get('VIENNA_API', ':9090').rpartition(':')[2]; urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=2)"]

ENTRYPOINT ["vienna"]
CMD ["run"]
