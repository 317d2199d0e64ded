# Herald node image: one process per container, data on a volume.
#
#   docker build -t herald .
#   docker run -d --name herald -v herald-data:/var/lib/herald \
#       -v $PWD/my-config.toml:/etc/herald/config.toml:ro -p 8080:8080 -p 9092:9092 -p 8765:8765 herald
#
# Debian's own Python 3.11 (bookworm), the interpreter `make serve` uses on a fresh Debian
# machine; every dependency installs from a wheel, so no compiler is needed.
FROM debian:bookworm-slim

RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/herald
ENV PATH=/opt/herald/bin:$PATH

WORKDIR /src
COPY pyproject.toml README.md ./
COPY broker ./broker
COPY storage ./storage
COPY gateway ./gateway
COPY channels ./channels
COPY notify ./notify
COPY herald ./herald
RUN pip install --no-cache-dir . && rm -rf /src

RUN useradd --system --home-dir /var/lib/herald --shell /usr/sbin/nologin herald \
    && mkdir -p /var/lib/herald /etc/herald && chown herald /var/lib/herald
COPY config.example.toml /etc/herald/config.toml
WORKDIR /var/lib/herald
USER herald
VOLUME /var/lib/herald
# The example config binds loopback (and without API keys the node serves loopback only): in
# a container, set API keys and listen.host = "0.0.0.0" in your own config and mount it over
# /etc/herald/config.toml (README, "Running in a container").
EXPOSE 8080 9092 8765
# /healthz answers 200 when ok, 503 when degraded (low disk, a partition offline); `herald
# health` finds it from the config the node runs with (listen.host and http-port; HTTPS,
# verified against the config's own certificate, when TLS is on)
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["herald", "health", "--config", "/etc/herald/config.toml", "--timeout", "3"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["herald", "serve", "--config", "/etc/herald/config.toml", "--data-dir", "/var/lib/herald"]
