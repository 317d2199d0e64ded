"""The ``herald`` client commands, run as a user runs them: ``python -m herald.cli ...`` in a
subprocess against a real ``herald serve`` on 127.0.0.1 (free ports, temporary data dir).
The pure output shapes (``broker/cli_format.py``) are tested at the end, without a node."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from herald import cli_format as fmt
from herald.cli import build_parser
from tests.integration.herald_process import free_port

HERALD = [sys.executable, "-m", "herald.cli"]
_READY = re.compile(rb"event=ready .*tcp_port=(\d+)")


def herald(
    *args: str, stdin: str | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*HERALD, *args], input=stdin, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A node with its TCP and HTTP ports chosen by the kernel (port 0, read back from the
    ``event=ready`` log line, so no other process can take them in between); yields the
    ``--bootstrap`` address and stops the node at teardown."""
    base = tmp_path_factory.mktemp("herald-cli")
    log_path = base / "node.log"
    serve = [*HERALD, "serve", "--tcp-port", "0", "--http-port", "0", "--ws-port", "0"]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [*serve, "--data-dir", str(base / "data")],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 30
            while not (m := _READY.search(log_path.read_bytes())):
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"herald serve did not start:\n{log_path.read_text()}")
                time.sleep(0.05)
            yield f"127.0.0.1:{int(m.group(1))}"
        finally:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _free_port() -> int:
    return free_port()  # the test process's own ports (tests/integration/herald_process.py)


def _ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return result


# --------------------------------------------------------------------------- help
HELP_COMMANDS = [
    [],
    ["serve"],
    ["topics"],
    ["topics", "create"],
    ["topics", "list"],
    ["topics", "describe"],
    ["topics", "delete"],
    ["produce"],
    ["consume"],
    ["groups"],
    ["groups", "list"],
    ["groups", "describe"],
]


def test_herald_help_runs_from_the_console_script() -> None:
    result = _ok(herald("--help"))
    for command in ("serve", "topics", "produce", "consume", "groups"):
        assert command in result.stdout


@pytest.mark.parametrize("command", HELP_COMMANDS, ids=lambda c: " ".join(c) or "herald")
def test_every_command_has_help_that_exits_zero(
    command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args([*command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: herald")
    if command and command not in (["serve"], ["topics"], ["groups"]):  # client commands
        assert "--bootstrap HOST:PORT" in out and "--json" in out and "--api-key" in out


# ------------------------------------------------------------------ against a node
def test_topics_create_list_describe_delete(node: str) -> None:
    b = ["--bootstrap", node]
    created = _ok(herald("topics", "create", "admin-t", "--partitions", "3", "--json", *b))
    body = json.loads(created.stdout)
    assert body["created"] is True and len(body["topic"]["partitions"]) == 3

    again = herald("topics", "create", "admin-t", *b)
    assert again.returncode == 1
    assert again.stderr.strip() == "herald: topic_exists: topic 'admin-t' already exists"
    assert "exists" in _ok(herald("topics", "create", "admin-t", "--exist-ok", *b)).stdout

    listed = _ok(herald("topics", "list", *b)).stdout
    assert re.search(r"^admin-t\s+3\s+0\s", listed, re.M), listed
    names = [t["name"] for t in json.loads(_ok(herald("topics", "list", "--json", *b)).stdout)]
    assert "admin-t" in names

    described = _ok(herald("topics", "describe", "admin-t", *b)).stdout
    assert described.startswith("topic admin-t  partitions 3  retention 7d / unlimited")
    assert len(re.findall(r"^\s+\d+\s+0\s+0\s+0\s", described, re.M)) == 3

    assert _ok(herald("topics", "delete", "admin-t", *b)).stdout == "deleted topic admin-t\n"
    gone = herald("topics", "describe", "admin-t", *b)
    assert gone.returncode == 1
    assert gone.stderr == "herald: unknown_topic: unknown topic 'admin-t'\n"


def test_produce_file_then_consume_in_group_returns_every_record_once(
    node: str, tmp_path: Path
) -> None:
    b = ["--bootstrap", node]
    _ok(herald("topics", "create", "orders", "--partitions", "4", *b))
    lines = [f"order-{i}" for i in range(1000)]
    src = tmp_path / "orders.txt"
    src.write_text("\n".join(lines) + "\n")

    produced = json.loads(_ok(herald("produce", "orders", "--file", str(src), "--json", *b)).stdout)
    assert produced["records"] == 1000 and sum(produced["partitions"].values()) == 1000

    out = _ok(herald("consume", "orders", "--group", "billing", "--json", "--max", "1000", *b))
    records = [json.loads(line) for line in out.stdout.splitlines()]
    assert sorted(r["value"] for r in records) == sorted(lines)
    assert {r["topic"] for r in records} == {"orders"}
    for partition in range(4):
        offsets = [r["offset"] for r in records if r["partition"] == partition]
        assert offsets == list(range(len(offsets)))  # in order, from the start, no gap
    assert all(r["key"] is None and r["timestamp"] > 0 for r in records)

    # the group committed what it printed: nothing left, and a rerun prints nothing
    group = json.loads(_ok(herald("groups", "describe", "billing", "--json", *b)).stdout)
    assert [o["lag"] for o in group["offsets"]] == [0, 0, 0, 0]
    assert sum(o["committed"] for o in group["offsets"]) == 1000
    text = _ok(herald("groups", "describe", "billing", *b)).stdout
    assert "total lag: 0" in text and "no live members" in text
    assert "billing" in _ok(herald("groups", "list", *b)).stdout.split()
    rerun = herald("consume", "orders", "--group", "billing", "--timeout-ms", "300", *b)
    assert _ok(rerun).stdout == ""


def test_consume_stops_at_max_and_commits_only_what_it_printed(node: str) -> None:
    b = ["--bootstrap", node]
    _ok(herald("produce", "one", "a", "b", "c", "d", "--partition", "0", *b))
    first = _ok(herald("consume", "one", "--group", "g1", "--max", "2", *b))
    assert first.stdout == "a\nb\n"
    rest = _ok(herald("consume", "one", "--group", "g1", "--timeout-ms", "300", *b))
    assert rest.stdout == "c\nd\n"


def test_produce_stdin_with_key_and_consume_one_partition_from_an_offset(node: str) -> None:
    b = ["--bootstrap", node]
    _ok(herald("topics", "create", "keyed", "--partitions", "2", *b))
    produced = json.loads(
        _ok(herald("produce", "keyed", "--key", "k", "--json", *b, stdin="x\ny\r\nz")).stdout
    )
    assert produced["records"] == 3 and len(produced["partitions"]) == 1  # one key, one partition
    (partition,) = produced["partitions"]
    out = _ok(herald("consume", "keyed", "--partition", partition, "--offset", "1", "--json", *b))
    records = [json.loads(line) for line in out.stdout.splitlines()]
    assert [(r["offset"], r["key"], r["value"]) for r in records] == [(1, "k", "y"), (2, "k", "z")]


def test_produce_synthetic_load_records(node: str) -> None:
    b = ["--bootstrap", node]
    produced = json.loads(
        _ok(herald("produce", "load", "--count", "5000", "--size", "64", "--json", *b)).stdout
    )
    assert produced["records"] == 5000 and produced["bytes"] == 5000 * 64
    out = _ok(herald("consume", "load", "--max", "5000", *b)).stdout.splitlines()
    assert len(out) == 5000 and {len(v) for v in out} == {64}


def test_usage_errors_exit_2_before_connecting() -> None:
    nowhere = ["--bootstrap", f"127.0.0.1:{_free_port()}"]
    result = herald("consume", "t", "--offset", "3", *nowhere)
    assert (result.returncode, result.stderr) == (2, "herald: --offset needs --partition\n")
    result = herald("produce", "t", "v", "--count", "3", *nowhere)
    assert result.returncode == 2 and "one way" in result.stderr
    result = herald("topics", "list", "--bootstrap", "no-port")
    assert result.returncode == 2 and "expected HOST:PORT" in result.stderr


@pytest.mark.parametrize(
    "command",
    [["topics", "list"], ["produce", "t", "v"], ["consume", "t"], ["groups", "describe", "g"]],
    ids=lambda c: " ".join(c),
)
def test_nothing_listening_is_a_clear_error_without_traceback(command: list[str]) -> None:
    port = _free_port()
    result = herald(*command, "--bootstrap", f"127.0.0.1:{port}", timeout=30)
    assert result.returncode == 1
    assert result.stderr.startswith(
        f"herald: cannot connect to 127.0.0.1:{port}: is `herald serve` running?"
    )
    assert "Traceback" not in result.stderr and result.stdout == ""


# --------------------------------------------------------------- pure formatting
def test_take_lines_keeps_the_unterminated_tail() -> None:
    buf = bytearray(b"a\r\nb\n\nc")
    assert fmt.take_lines(buf) == [b"a", b"b", b""]
    assert buf == b"c"
    assert fmt.take_lines(buf) == []


def test_format_table_aligns_numbers_right_and_shows_none_as_dash() -> None:
    table = fmt.format_table(["NAME", "LAG"], [("a", 5), ("long-name", None), ("b", 120)])
    assert table.splitlines() == [
        "NAME       LAG",
        "a            5",
        "long-name    -",
        "b          120",
    ]


def test_progress_is_silent_for_a_second_then_throttled() -> None:
    tty = fmt.Progress(100, tty=True, started=0.0)
    assert tty.update(10, 0.5) == ""
    assert (
        tty.update(50, 1.0)
        == "\r\x1b[K[###############...............]  50%  50/100 records  50 records/s"
    )
    assert tty.update(60, 1.05) == ""
    assert tty.finish() == "\r\x1b[K"
    plain = fmt.Progress(None, tty=False, started=0.0)
    assert plain.update(3000, 1.5) == "3,000 records  2,000 records/s  1.5s\n"
    assert plain.update(4000, 2.0) == ""
    assert plain.finish() == ""


def test_parse_bootstrap_accepts_host_port_and_bracketed_ipv6() -> None:
    assert fmt.parse_bootstrap("127.0.0.1:9092") == ("127.0.0.1", 9092)
    assert fmt.parse_bootstrap("[::1]:19092") == ("::1", 19092)
    for bad in ("9092", "host:", "host:99999", ":9092"):
        with pytest.raises(Exception, match="HOST:PORT"):
            fmt.parse_bootstrap(bad)


def test_synthetic_values_have_the_asked_size_and_differ() -> None:
    values = [v for chunk in fmt.synthetic_values(2500, 8, chunk=1000) for v in chunk]
    assert len(values) == 2500 == len(set(values))
    assert {len(v) for v in values} == {8}
