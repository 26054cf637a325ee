# syntax=docker/dockerfile:1
# The relay daemon. Build: docker build -t outbox-relay .
# Run:   docker run --rm -p 9187:9187 -e RELAY_POSTGRES__URL=... -e RELAY_KAFKA__BOOTSTRAP_SERVERS=... \
#          -e RELAY_HTTP__LISTEN=0.0.0.0:9187 outbox-relay cdc
# Liveness/readiness: GET /healthz and /readyz on port 9187 (the orchestrator probes them, so no
# HEALTHCHECK here: the slim image has no HTTP client, and adding one only for this is not worth it).

FROM rust:1-bookworm AS builder
WORKDIR /src
# cmake is not needed: rdkafka builds its bundled librdkafka with make and a C compiler. It
# links Debian's OpenSSL (TLS, SASL SCRAM/OAUTHBEARER), libcurl (OAUTHBEARER OIDC), zlib and zstd.
RUN apt-get update \
 && apt-get install -y --no-install-recommends pkg-config libssl-dev libcurl4-openssl-dev zlib1g-dev libzstd-dev \
 && rm -rf /var/lib/apt/lists/*
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p relay --bin relay \
 && cp target/release/relay /usr/local/bin/relay

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libssl3 libcurl4 zlib1g libzstd1 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin relay
COPY --from=builder /usr/local/bin/relay /usr/local/bin/relay
USER 10001:10001
# JSON logs for the container runtime; the metrics/health endpoint reachable from outside.
ENV RELAY_LOG__FORMAT=json \
    RELAY_HTTP__LISTEN=0.0.0.0:9187
EXPOSE 9187
ENTRYPOINT ["relay"]
