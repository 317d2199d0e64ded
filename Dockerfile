# Herald node image: one process per container, data on a volume.
FROM python:3.11-slim-bookworm

WORKDIR /app
COPY pyproject.toml README.md ./
COPY broker ./broker
COPY storage ./storage
COPY gateway ./gateway
COPY channels ./channels
RUN pip install --no-cache-dir .

COPY config.example.toml /etc/herald/config.toml
VOLUME /var/lib/herald
# The example config binds loopback; in a container, configure API keys and
# listen.host = "0.0.0.0" in your own config and mount it over /etc/herald/config.toml.
EXPOSE 8080 9092 8765
STOPSIGNAL SIGTERM
ENTRYPOINT ["herald", "serve", "--config", "/etc/herald/config.toml", "--data-dir", "/var/lib/herald"]
