"""``herald dlq|users|events``, run as a user runs them (``python -m herald.cli ...`` in a
subprocess) against a real node's HTTP API on 127.0.0.1 with an API key; webhooks go to a
receiver in the test process. The pure output shapes are tested at the end, without a node."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from herald import cli_format as fmt
from herald.cli import build_parser
from tests.integration.herald_process import HeraldProcess, Nodes

from .api_client import ApiClient
from .support import SECRET, Receiver
from .test_api import ADMIN, CONFIG, READ, status_of

HERALD = [sys.executable, "-m", "herald.cli"]


@pytest.fixture(scope="module")
def cli_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HeraldProcess]:
    nodes = Nodes(tmp_path_factory.mktemp("cli"))
    try:
        yield nodes(config=CONFIG)
    finally:
        nodes.close()


@pytest.fixture
async def api(cli_node: HeraldProcess) -> AsyncIterator[ApiClient]:
    async with aiohttp.ClientSession() as s:
        yield ApiClient(s, cli_node.http_url, ADMIN)


async def herald(
    node: HeraldProcess | None, *args: str, key: str | None = ADMIN
) -> subprocess.CompletedProcess[str]:
    """Run ``herald ARGS`` off the loop (the receiver in this process must keep serving)."""
    conn = ["--url", node.http_url] if node is not None else []
    if key is not None:
        conn += ["--api-key", key]
    return await asyncio.to_thread(
        subprocess.run, [*HERALD, *args, *conn], capture_output=True, text=True, timeout=60
    )


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return result


@pytest.mark.parametrize(
    "command",
    [
        ["dlq", "list"],
        ["dlq", "show"],
        ["dlq", "replay"],
        ["dlq", "purge"],
        ["users", "get"],
        ["users", "put"],
        ["users", "delete"],
        ["users", "export"],
        ["events", "show"],
    ],
    ids=" ".join,
)
def test_every_http_command_has_help_with_url_key_and_json(
    command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args([*command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: herald") and "--url URL" in out
    assert "--api-key" in out and "--json" in out


async def test_users_put_get_export_delete(cli_node: HeraldProcess, tmp_path: Path) -> None:
    put = ok(await herald(cli_node, "users", "put", "zoe", "--email", "zoe@example.com",
                          "--webhook-url", "http://127.0.0.1:9/h", "--json"))  # fmt: skip
    user = json.loads(put.stdout)
    assert user["email"] == "zoe@example.com" and user["webhook"]["secret"].startswith("whsec_")
    got = ok(await herald(cli_node, "users", "get", "zoe"))
    assert "user zoe" in got.stdout and "email: zoe@example.com" in got.stdout
    hidden = ok(await herald(cli_node, "users", "get", "zoe", "--json", key=READ))
    assert json.loads(hidden.stdout)["webhook"]["secret"] is None
    out = tmp_path / "zoe.json"
    ok(await herald(cli_node, "users", "export", "zoe", "--output", str(out)))
    assert json.loads(out.read_text())["profile"]["email"] == "zoe@example.com"
    gone = ok(await herald(cli_node, "users", "delete", "zoe"))
    assert gone.stdout.startswith("erased zoe: ")
    missing = await herald(cli_node, "users", "get", "zoe")
    assert missing.returncode == 1
    assert missing.stderr == "herald: unknown_user: no user 'zoe' [user]\n"
    bad = await herald(cli_node, "users", "put", "zoe", "--email", "nope")
    assert bad.returncode == 1 and "invalid_request" in bad.stderr and "[email]" in bad.stderr


async def test_events_show_and_the_dead_letter_commands(
    cli_node: HeraldProcess, api: ApiClient, receiver: Receiver
) -> None:
    await api.ok("PUT", "/users/yan", {"webhook": {"url": receiver.url("yan"), "secret": SECRET}})
    await api.ok("PUT", "/workflows/cli-hook", {"steps": [{"channel": "webhook"}]})
    receiver.status["yan"] = 400
    acks = [await api.ok("POST", "/events", {"topic": "cli-hook", "payload": {"n": n},
                                             "users": ["yan"]}) for n in range(3)]  # fmt: skip
    for ack in acks:
        await status_of(api, ack["event_id"], lambda r: r[0]["status"] == "dead_lettered")

    shown = ok(await herald(cli_node, "events", "show", acks[0]["event_id"]))
    assert f"event {acks[0]['event_id']}" in shown.stdout
    assert "dead_lettered" in shown.stdout and "http_400" in shown.stdout
    listed = json.loads(ok(await herald(cli_node, "dlq", "list", "webhook", "--json")).stdout)
    ids = sorted(x["delivery_id"] for x in listed["dead_letters"] if x["user"] == "yan")
    assert len(ids) == 3
    text = ok(await herald(cli_node, "dlq", "list", "webhook")).stdout
    assert text.startswith("DELIVERY") and ids[0] in text
    detail = ok(await herald(cli_node, "dlq", "show", "webhook", ids[0])).stdout
    assert f"dead letter {ids[0]} on webhook: http_400" in detail and "1. at" in detail

    purged = ok(await herald(cli_node, "dlq", "purge", "webhook", ids[2], "--json"))
    assert json.loads(purged.stdout) == {"purged": [ids[2]], "missing": []}
    receiver.status.pop("yan")
    replayed = ok(await herald(cli_node, "dlq", "replay", "webhook", "--all"))
    assert replayed.stdout.startswith("replayed 2 dead letters on webhook")
    await receiver.wait_for(lambda: len(receiver.for_user("yan")) == 2, what="two replays")
    assert {h.webhook_id for h in receiver.for_user("yan")} == set(ids[:2])
    again = await herald(cli_node, "dlq", "replay", "webhook", ids[0])
    assert again.returncode == 1 and f"not found: {ids[0]}" in again.stdout


async def test_usage_and_connection_failures_are_one_line(cli_node: HeraldProcess) -> None:
    usage = await herald(cli_node, "dlq", "replay", "webhook")
    assert (usage.returncode, usage.stderr) == (
        2,
        "herald: give dead letter ids or --all (not both)\n",
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    nowhere = await asyncio.to_thread(
        subprocess.run,
        [*HERALD, "users", "get", "u", "--url", f"http://127.0.0.1:{port}"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert nowhere.returncode == 1 and "Traceback" not in nowhere.stderr
    assert nowhere.stderr.startswith(f"herald: cannot connect to http://127.0.0.1:{port}")
    nokey = await herald(cli_node, "users", "get", "u", key=None)
    assert nokey.returncode == 1 and nokey.stderr.endswith("(give one with --api-key)\n")
    bad_url = await herald(None, "users", "get", "u", "--url", "127.0.0.1:8080")
    assert bad_url.returncode == 2 and "expected http://HOST:PORT" in bad_url.stderr


# ------------------------------------------------------------------ pure formatting
def test_event_status_table_names_why() -> None:
    table = fmt.event_status_table(
        {
            "event_id": "e1",
            "recipients": [
                {"user": "ann", "channel": "webhook", "status": "delivered", "reason": None,
                 "detail": None, "attempts": [{}], "engagement": ["seen"]},
                {"user": "bob", "channel": "email", "status": "suppressed",
                 "reason": "preference", "detail": "user rule rules[0]", "attempts": [],
                 "engagement": []},
            ],
        }
    )  # fmt: skip
    lines = table.splitlines()
    assert lines[0] == "event e1"
    assert lines[1].split() == ["USER", "CHANNEL", "STATUS", "ATTEMPTS", "ENGAGEMENT", "WHY"]
    assert lines[2].split() == ["ann", "webhook", "delivered", "1", "seen", "-"]
    assert lines[3].endswith("preference: user rule rules[0]")


def test_format_age_and_progress_units() -> None:
    assert [fmt.format_age(ms) for ms in (999, 42_000, 300_000, 7_200_000, 172_800_000)] == [
        "0s", "42s", "5m", "2h", "2d",
    ]  # fmt: skip
    assert fmt.progress_line(5, 10, 1.0, width=10, unit="dead letters").endswith(
        "5/10 dead letters  5 dead letters/s"
    )
