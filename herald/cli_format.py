"""What the ``herald`` CLI reads and prints, as pure functions: argument types, tables,
record lines, progress lines, line splitting and synthetic load records. No I/O and no clock
(the time is an argument), so every output shape is testable without a node;
``broker/cli_client.py`` does the I/O.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import msgspec

from broker import protocol as p
from broker.client import ConsumerRecord


def parse_bootstrap(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (IPv6 as ``[::1]:9092``) -> (host, port); an argparse type."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


def natural(value: str) -> int:
    """A non-negative integer; an argparse type."""
    if not value.isdigit():
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {value!r}")
    return int(value)


def format_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def format_duration_ms(ms: int | None) -> str:
    if ms is None:
        return "unlimited"
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if ms >= size and ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms}ms"


def format_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """Aligned columns; a column whose cells are all integers is right-aligned."""
    body = [list(r) for r in rows]
    numeric = [all(isinstance(r[i], int | None) for r in body) for i in range(len(headers))]
    cells = [list(headers)] + [["-" if c is None else str(c) for c in r] for r in body]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for row in cells:
        parts = [
            c.rjust(w) if num else c.ljust(w)
            for c, w, num in zip(row, widths, numeric, strict=True)
        ]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def topics_table(topics: Sequence[p.TopicInfo]) -> str:
    rows = [
        (
            t.name,
            len(t.partitions),
            sum(q.high_watermark - q.log_start_offset for q in t.partitions),
            format_size(sum(q.size_bytes for q in t.partitions)),
            format_duration_ms(t.retention_ms),
            "unlimited" if t.retention_bytes is None else format_size(t.retention_bytes),
        )
        for t in sorted(topics, key=lambda t: t.name)
    ]
    return format_table(["TOPIC", "PARTITIONS", "RECORDS", "SIZE", "RETENTION", "MAX-SIZE"], rows)


def topic_description(t: p.TopicInfo) -> str:
    retention_bytes = "unlimited" if t.retention_bytes is None else format_size(t.retention_bytes)
    head = (
        f"topic {t.name}  partitions {len(t.partitions)}  "
        f"retention {format_duration_ms(t.retention_ms)} / {retention_bytes}"
    )
    rows = [
        (q.partition, q.leader, q.log_start_offset, q.high_watermark, q.size_bytes, q.segments)
        for q in t.partitions
    ]
    headers = ["PARTITION", "LEADER", "LOG-START", "HIGH-WATERMARK", "BYTES", "SEGMENTS"]
    return head + "\n" + format_table(headers, rows)


def group_description(g: p.GroupInfo) -> str:
    lines = [
        f"group {g.group}  state {g.state}  generation {g.generation}  assignor {g.assignor}",
        f"topics: {', '.join(g.topics) or '-'}",
        "",
    ]
    if g.members:
        members = [
            (
                m.member_id,
                m.client_id,
                " ".join(f"{t}/{i}" for t, i in m.assignment) or "-",
                f"{m.last_heartbeat_ms_ago}ms ago",
            )
            for m in g.members
        ]
        lines += [format_table(["MEMBER", "CLIENT", "ASSIGNMENT", "HEARTBEAT"], members), ""]
    else:
        lines += ["no live members", ""]
    lags = [
        (o.topic, o.partition, None if o.committed < 0 else o.committed, o.high_watermark, o.lag)
        for o in g.offsets
    ]
    lines.append(format_table(["TOPIC", "PARTITION", "COMMITTED", "HIGH-WATERMARK", "LAG"], lags))
    lines.append(f"total lag: {sum(o.lag for o in g.offsets)}")
    return "\n".join(lines)


def record_line(rec: ConsumerRecord, as_json: bool) -> str:
    """One output line for a record: the value as UTF-8, or a JSON object."""
    value = rec.value.decode("utf-8", "backslashreplace")
    if not as_json:
        return value + "\n"
    key = None if rec.key is None else rec.key.decode("utf-8", "backslashreplace")
    obj = {
        "topic": rec.topic,
        "partition": rec.partition,
        "offset": rec.offset,
        "timestamp": rec.timestamp,
        "key": key,
        "value": value,
    }
    return msgspec.json.encode(obj).decode() + "\n"


def progress_line(
    done: int, total: int | None, elapsed: float, width: int = 30, unit: str = "records"
) -> str:
    rate = done / elapsed if elapsed > 0 else 0.0
    if not total:
        return f"{done:,} {unit}  {rate:,.0f} {unit}/s  {elapsed:.1f}s"
    frac = min(done / total, 1.0)
    filled = int(frac * width)
    bar = "#" * filled + "." * (width - filled)
    return f"[{bar}] {frac:4.0%}  {done:,}/{total:,} {unit}  {rate:,.0f} {unit}/s"


class Progress:
    """When and what to draw for a long run's progress: on a terminal one line redrawn in
    place ten times a second, else a line every five seconds; nothing during the first second,
    so short runs print nothing. The caller passes the time and writes what it gets."""

    def __init__(
        self, total: int | None, *, tty: bool, started: float, unit: str = "records"
    ) -> None:
        self.total, self.tty, self.started, self.unit = total, tty, started, unit
        self._next = started + 1.0
        self._drawn = False

    def update(self, done: int, now: float) -> str:
        if now < self._next:
            return ""
        self._next = now + (0.1 if self.tty else 5.0)
        self._drawn = True
        line = progress_line(done, self.total, now - self.started, unit=self.unit)
        return f"\r\x1b[K{line}" if self.tty else line + "\n"

    def finish(self) -> str:
        """What clears the drawn line (a terminal's; plain lines stay)."""
        return "\r\x1b[K" if self.tty and self._drawn else ""


def take_lines(buf: bytearray) -> list[bytes]:
    """Remove the complete lines from ``buf`` and return them without their ``\\n`` (or
    ``\\r\\n``); an unterminated tail stays in ``buf``."""
    end = buf.rfind(b"\n")
    if end < 0:
        return []
    lines = bytes(buf[:end]).split(b"\n")
    del buf[: end + 1]
    return [line[:-1] if line.endswith(b"\r") else line for line in lines]


def synthetic_values(count: int, size: int, chunk: int = 1000) -> Iterator[list[bytes]]:
    """``count`` distinct values of exactly ``size`` bytes, ``chunk`` at a time (for load)."""
    filler = b"x" * size
    for start in range(0, count, chunk):
        yield [(b"%d " % i + filler)[:size] for i in range(start, min(start + chunk, count))]


def produce_summary(
    topic: str, records: int, nbytes: int, seconds: float, partitions: dict[int, int]
) -> dict[str, Any]:
    """The summary ``herald produce`` prints (as JSON with ``--json``)."""
    return {
        "topic": topic,
        "records": records,
        "bytes": nbytes,
        "seconds": round(seconds, 3),
        "records_per_second": round(records / seconds) if seconds > 0 else 0,
        "partitions": {str(k): v for k, v in sorted(partitions.items())},
    }


def produce_summary_text(s: dict[str, Any]) -> str:
    parts = " ".join(f"{k}:{v}" for k, v in s["partitions"].items()) or "-"
    noun = "record" if s["records"] == 1 else "records"
    return (
        f"produced {s['records']:,} {noun} ({format_size(s['bytes'])}) to {s['topic']} in "
        f"{s['seconds']:.2f}s ({s['records_per_second']:,} records/s); partitions {parts}"
    )


# ------------------------------------------------------------- the notification API
def format_age(ms: int) -> str:
    """A duration in the largest whole unit: ``42s``, ``5m``, ``3h``, ``2d``."""
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000)):
        if ms >= size:
            return f"{ms // size}{unit}"
    return f"{max(ms, 0) // 1000}s"


def dead_letters_table(letters: Sequence[dict[str, Any]], *, now_ms: int) -> str:
    rows = [
        (
            x["delivery_id"],
            x["user"],
            x["topic"],
            x["reason"],
            len(x["attempts"]),
            format_age(now_ms - x["dead_ms"]) + " ago",
        )
        for x in letters
    ]
    return format_table(("DELIVERY", "USER", "TOPIC", "REASON", "ATTEMPTS", "DEAD"), rows)


def dead_letter_description(x: dict[str, Any]) -> str:
    lines = [
        f"dead letter {x['delivery_id']} on {x['channel']}: {x['reason']}",
        f"  event {x['event_id']}  topic {x['topic']}  user {x['user']}  "
        f"priority {x['priority']}  replayed {x['replay']} times",
        "  attempts:",
    ]
    for i, a in enumerate(x["attempts"], 1):
        detail = f"  {a['detail']}" if a.get("detail") else ""
        lines.append(f"    {i}. at {a['at_ms']}  {a['outcome']}{detail}")
    lines.append(f"  data: {msgspec.json.encode(x['data']).decode()}")
    return "\n".join(lines)


def user_description(u: dict[str, Any]) -> str:
    lines = [f"user {u['id']}"]
    for key in ("email", "phone", "timezone", "locale"):
        if u.get(key) is not None:
            lines.append(f"  {key}: {u[key]}")
    hook = u.get("webhook")
    if hook:
        secret = f"  secret {hook['secret']}" if hook.get("secret") else ""
        lines.append(f"  webhook: {hook['url']}{secret}")
    for d in u.get("devices", []):
        dead = "  (invalid)" if d.get("invalid_since_ms") else ""
        lines.append(f"  device: {d['platform']} {d['token']}{dead}")
    return "\n".join(lines)


def erasure_summary(e: dict[str, Any]) -> str:
    parts = [
        f"{e[k]} {k.replace('_', ' ')}"
        for k in (
            "registry_rows",
            "notifications",
            "statuses",
            "parked_runs",
            "batch_windows",
            "dead_letters",
        )
        if e.get(k)
    ]
    return f"erased {e['user']}: " + (", ".join(parts) if parts else "nothing was held")


def event_status_table(st: dict[str, Any]) -> str:
    rows = []
    for r in st["recipients"]:
        why = r.get("reason") or ""
        if r.get("detail") and r.get("detail") != why:
            why = f"{why}: {r['detail']}" if why else r["detail"]
        rows.append(
            (
                r["user"],
                r["channel"],
                r["status"],
                len(r["attempts"]),
                ",".join(r["engagement"]) or None,
                why or None,
            )
        )
    table = format_table(("USER", "CHANNEL", "STATUS", "ATTEMPTS", "ENGAGEMENT", "WHY"), rows)
    return f"event {st['event_id']}\n{table}"
