# Multi-stage build of sluice. librdkafka is compiled from its vendored source
# by the rdkafka crate, so the runtime image needs no Kafka library; it links
# the system OpenSSL (Kafka TLS/SASL), so the runtime image has libssl3. The
# rust image already carries libssl-dev and pkg-config.
FROM rust:1.85-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin sluice

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libssl3 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --home-dir /var/lib/sluice --create-home --shell /usr/sbin/nologin sluice
COPY --from=build /src/target/release/sluice /usr/local/bin/sluice
COPY sluice.example.toml /etc/sluice/sluice.toml
USER sluice
VOLUME ["/var/lib/sluice"]
EXPOSE 8080
# SIGTERM drains and exits 0; give it replay.drain-timeout-ms plus margin
# (docker compose stop_grace_period below).
ENTRYPOINT ["/usr/local/bin/sluice"]
CMD ["serve", "--config", "/etc/sluice/sluice.toml", "--data-dir", "/var/lib/sluice", "--listen", "0.0.0.0:8080"]
