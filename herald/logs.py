"""Structured logging: one line per event, ``key=value`` (logfmt) or JSON.

Modules log messages that already read ``event=name key=value ...``; this formatter adds the
time, level and logger in the same shape, so a delivery can be followed with grep.
"""

from __future__ import annotations

import logging
import sys
import time

import orjson


class LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        line = (
            f"ts={ts}.{int(record.msecs):03d}Z level={record.levelname.lower()} "
            f"logger={record.name} {record.getMessage()}"
        )
        if record.exc_info:
            exc = self.formatException(record.exc_info).replace("\n", "\\n")
            line += f' exc="{exc}"'
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": record.created,
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        msg = record.getMessage()
        # "event=x a=b" messages become fields; anything else stays in "msg"
        parts = msg.split(" ")
        if parts and all("=" in part for part in parts):
            for part in parts:
                k, _, v = part.partition("=")
                entry[k] = v
        else:
            entry["msg"] = msg
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry).decode()


def setup_logging(level: str = "info", fmt: str = "logfmt") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else LogfmtFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp's access log is one line per request: too much at our request rates
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
