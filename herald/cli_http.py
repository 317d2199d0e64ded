"""Client commands of the ``herald`` CLI that talk to a node's HTTP API (``docs/API.md``):
``dlq list|show|replay|purge``, ``users get|put|delete|export``, ``events show``.

They follow ``herald/cli_client.py``'s conventions: ``--api-key`` and ``--json`` on every
command (``--url`` in place of ``--bootstrap``: the notification API is HTTP only), output
shaped by the pure functions of ``herald/cli_format.py``, a progress line on stderr for runs
longer than a second (replaying or purging many dead letters), and expected failures as one
line on stderr with an exit status: 1 for a failed operation (nothing listening, an error the
node answered), 2 for bad usage, 130 for Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import quote, urlsplit

import aiohttp
import msgspec

from herald import cli_format as fmt

REPLAY_CHUNK = 1000  # ids per replay request (the API's bound)


class UsageError(Exception):
    pass


class CannotConnect(Exception):
    pass


class ApiFailed(Exception):
    """The node answered an error: ``{"error": {"code", "message", "field"}}``."""

    def __init__(self, status: int, code: str, message: str, field: str | None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.field = status, code, message, field


def parse_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise argparse.ArgumentTypeError(f"expected http://HOST:PORT, got {value!r}")
    return value.rstrip("/")


def _seg(value: str) -> str:
    """One path segment, so an id with ``/`` or ``?`` stays one segment."""
    return quote(value, safe="")


class Http:
    """One session against ``url`` with the API key, decoding JSON answers."""

    def __init__(self, session: aiohttp.ClientSession, url: str, api_key: str | None) -> None:
        self.session, self.url = session, url
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    async def __call__(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else msgspec.json.encode(body)
        headers = dict(self.headers)
        if data is not None:
            headers["Content-Type"] = "application/json"
        try:
            async with self.session.request(
                method, self.url + path, data=data, headers=headers
            ) as resp:
                raw = await resp.read()
        except aiohttp.ClientConnectionError as exc:
            raise CannotConnect(
                f"cannot connect to {self.url}: is `herald serve` running? ({exc})"
            ) from None
        try:
            answer = msgspec.json.decode(raw)
        except msgspec.DecodeError:
            raise ApiFailed(resp.status, "bad_answer", raw[:200].decode(errors="replace"), None)
        if resp.status >= 400:
            err = answer.get("error", {}) if isinstance(answer, dict) else {}
            raise ApiFailed(
                resp.status,
                str(err.get("code", resp.status)),
                str(err.get("message", "")),
                err.get("field"),
            )
        return answer


def _print(args: argparse.Namespace, obj: Any, text: str) -> None:
    print(msgspec.json.encode(obj).decode() if args.json else text)


# ----------------------------------------------------------------------- dead letters
async def _dlq_list(http: Http, args: argparse.Namespace) -> int:
    path = f"/dlq/{_seg(args.channel)}?limit={args.limit}"
    if args.after:
        path += f"&after={quote(args.after, safe='')}"
    page = await http("GET", path)
    letters = page["dead_letters"]
    text = (
        fmt.dead_letters_table(letters, now_ms=time.time_ns() // 1_000_000)
        if letters
        else (f"no dead letters on {args.channel}")
    )
    if page["next_after"]:
        text += f"\nmore: --after {page['next_after']}"
    _print(args, page, text)
    return 0


async def _dlq_show(http: Http, args: argparse.Namespace) -> int:
    letter = await http("GET", f"/dlq/{_seg(args.channel)}/{_seg(args.id)}")
    _print(args, letter, fmt.dead_letter_description(letter))
    return 0


async def _dlq_replay(http: Http, args: argparse.Namespace) -> int:
    channel = _seg(args.channel)
    started = time.monotonic()
    progress = fmt.Progress(
        None if args.all else len(args.ids),
        tty=sys.stderr.isatty(),
        started=started,
        unit="dead letters",
    )
    replayed: list[str] = []
    missing: list[str] = []
    if args.all:
        # a page at a time, so progress shows; replayed letters leave the list
        while True:
            page = await http("GET", f"/dlq/{channel}?limit={REPLAY_CHUNK}")
            ids = [x["delivery_id"] for x in page["dead_letters"]]
            if not ids:
                break
            done = await http("POST", f"/dlq/{channel}/replay", {"ids": ids})
            replayed += done["replayed"]
            if not done["replayed"]:
                break  # nothing moved: do not spin
            _progress(args, progress, len(replayed))
    else:
        for i in range(0, len(args.ids), REPLAY_CHUNK):
            done = await http(
                "POST", f"/dlq/{channel}/replay", {"ids": args.ids[i : i + REPLAY_CHUNK]}
            )
            replayed += done["replayed"]
            missing += done["missing"]
            _progress(args, progress, len(replayed) + len(missing))
    _finish(args, progress)
    text = f"replayed {len(replayed)} dead letters on {args.channel}"
    if missing:
        text += f"; not found: {', '.join(missing)}"
    _print(args, {"replayed": replayed, "missing": missing}, text)
    return 1 if missing else 0


async def _dlq_purge(http: Http, args: argparse.Namespace) -> int:
    channel = _seg(args.channel)
    progress = fmt.Progress(
        len(args.ids), tty=sys.stderr.isatty(), started=time.monotonic(), unit="dead letters"
    )
    purged: list[str] = []
    missing: list[str] = []
    for n, delivery_id in enumerate(args.ids, 1):
        try:
            await http("DELETE", f"/dlq/{channel}/{_seg(delivery_id)}")
            purged.append(delivery_id)
        except ApiFailed as exc:
            if exc.status != 404:
                raise
            missing.append(delivery_id)
        _progress(args, progress, n)
    _finish(args, progress)
    text = f"purged {len(purged)} dead letters on {args.channel}"
    if missing:
        text += f"; not found: {', '.join(missing)}"
    _print(args, {"purged": purged, "missing": missing}, text)
    return 1 if missing else 0


def _progress(args: argparse.Namespace, progress: fmt.Progress, done: int) -> None:
    if not args.quiet and (line := progress.update(done, time.monotonic())):
        sys.stderr.write(line)


def _finish(args: argparse.Namespace, progress: fmt.Progress) -> None:
    if not args.quiet and (line := progress.finish()):
        sys.stderr.write(line)


# ---------------------------------------------------------------------------- users
async def _users_get(http: Http, args: argparse.Namespace) -> int:
    user = await http("GET", f"/users/{_seg(args.id)}")
    _print(args, user, fmt.user_description(user))
    return 0


def _user_body(args: argparse.Namespace) -> dict[str, Any]:
    given = {
        k: getattr(args, k)
        for k in ("email", "phone", "timezone", "locale")
        if getattr(args, k) is not None
    }
    if args.body is not None:
        if given or args.webhook_url or args.webhook_secret:
            raise UsageError("give the user as --body JSON or as options, not both")
        try:
            body = msgspec.json.decode(args.body)
        except msgspec.DecodeError as exc:
            raise UsageError(f"--body is not JSON: {exc}") from None
        if not isinstance(body, dict):
            raise UsageError("--body must be a JSON object")
        return body
    if args.webhook_secret and not args.webhook_url:
        raise UsageError("--webhook-secret needs --webhook-url")
    if args.webhook_url:
        hook = {"url": args.webhook_url}
        if args.webhook_secret:
            hook["secret"] = args.webhook_secret
        given["webhook"] = hook
    return given


async def _users_put(http: Http, args: argparse.Namespace) -> int:
    user = await http("PUT", f"/users/{_seg(args.id)}", _user_body(args))
    _print(args, user, fmt.user_description(user))
    return 0


async def _users_delete(http: Http, args: argparse.Namespace) -> int:
    erased = await http("DELETE", f"/users/{_seg(args.id)}")
    _print(args, erased, fmt.erasure_summary(erased))
    return 0


async def _users_export(http: Http, args: argparse.Namespace) -> int:
    if not args.quiet and sys.stderr.isatty():
        sys.stderr.write(f"exporting {args.id}...\r")
    export = await http("GET", f"/users/{_seg(args.id)}/export")
    if not args.quiet and sys.stderr.isatty():
        sys.stderr.write("\r\x1b[K")
    raw = msgspec.json.format(msgspec.json.encode(export), indent=2)
    if args.output:
        with open(args.output, "wb") as f:
            f.write(raw + b"\n")
        _print(
            args,
            {"user": args.id, "written": args.output},
            f"wrote everything held on {args.id} to {args.output}",
        )
    else:
        sys.stdout.write((msgspec.json.encode(export) if args.json else raw).decode() + "\n")
    return 0


# ---------------------------------------------------------------------------- events
async def _events_show(http: Http, args: argparse.Namespace) -> int:
    status = await http("GET", f"/events/{_seg(args.id)}")
    _print(args, status, fmt.event_status_table(status))
    return 0


Command = Callable[[Http, argparse.Namespace], Awaitable[int]]


def _runner(
    command: Command, check: Callable[[argparse.Namespace], None] | None = None
) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        import uvloop

        async def main() -> int:
            timeout = aiohttp.ClientTimeout(total=args.timeout, connect=5)
            async with aiohttp.ClientSession(timeout=timeout) as session:
                return await command(Http(session, args.url, args.api_key), args)

        try:
            if check is not None:
                check(args)
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                return runner.run(main())
        except UsageError as exc:
            print(f"herald: {exc}", file=sys.stderr)
            return 2
        except CannotConnect as exc:
            print(f"herald: {exc}", file=sys.stderr)
        except TimeoutError:
            print(f"herald: no answer from {args.url} within {args.timeout}s", file=sys.stderr)
        except ApiFailed as exc:
            hint = " (give one with --api-key)" if exc.code == "unauthenticated" else ""
            field = f" [{exc.field}]" if exc.field else ""
            print(f"herald: {exc.code}: {exc.message}{field}{hint}", file=sys.stderr)
        except OSError as exc:  # e.g. --output cannot be written
            print(f"herald: {exc}", file=sys.stderr)
        except KeyboardInterrupt:
            return 130
        return 1

    return run


def _check_replay(args: argparse.Namespace) -> None:
    if bool(args.ids) == bool(args.all):
        raise UsageError("give dead letter ids or --all (not both)")


def add_commands(subparsers: Any) -> None:
    """Add ``dlq``, ``users`` and ``events`` to ``herald``'s subparsers."""
    common = argparse.ArgumentParser(add_help=False)
    opts = common.add_argument_group("connection and output")
    opts.add_argument(
        "--url",
        type=parse_url,
        default="http://127.0.0.1:8080",
        metavar="URL",
        help="the node's HTTP address (default: http://127.0.0.1:8080)",
    )
    opts.add_argument("--api-key", metavar="KEY", help="API key, when the node requires one")
    opts.add_argument("--json", action="store_true", help="machine-readable JSON output")
    opts.add_argument(
        "--timeout", type=float, default=60.0, metavar="S", help="seconds per request (60)"
    )

    def leaf(parent: Any, name: str, command: Command, text: str, **kw: Any) -> Any:
        first = text.replace(":", ".").split(".")[0]
        summary = first[0].lower() + first[1:]
        sp = parent.add_parser(name, parents=[common], help=summary, description=text)
        sp.set_defaults(func=_runner(command, **kw))
        return sp

    def family(name: str, text: str) -> Any:
        parser = subparsers.add_parser(name, help=text, description=text.capitalize() + ".")
        return parser.add_subparsers(dest=f"{name}_command", required=True, metavar="ACTION")

    dlq = family("dlq", "list, show, replay and purge dead letters")
    ls = leaf(dlq, "list", _dlq_list, "List a channel's dead letters, a page at a time.")
    ls.add_argument("channel", metavar="CHANNEL")
    ls.add_argument("--limit", type=fmt.natural, default=100, metavar="N", help="page size")
    ls.add_argument("--after", metavar="ID", help="the page after this delivery id")
    show = leaf(dlq, "show", _dlq_show, "Show one dead letter: why it died, every attempt.")
    show.add_argument("channel", metavar="CHANNEL")
    show.add_argument("id", metavar="DELIVERY_ID")
    replay = leaf(
        dlq,
        "replay",
        _dlq_replay,
        "Send dead letters again (the same delivery ids, a fresh attempt count): the given "
        "ids, or --all. Shows progress on stderr when it takes more than a second.",
        check=_check_replay,
    )
    replay.add_argument("channel", metavar="CHANNEL")
    replay.add_argument("ids", nargs="*", metavar="DELIVERY_ID")
    replay.add_argument("--all", action="store_true", help="every dead letter of the channel")
    replay.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")
    purge = leaf(dlq, "purge", _dlq_purge, "Delete dead letters for good.")
    purge.add_argument("channel", metavar="CHANNEL")
    purge.add_argument("ids", nargs="+", metavar="DELIVERY_ID")
    purge.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")

    users = family("users", "get, create or replace, erase and export users")
    get = leaf(users, "get", _users_get, "Show a user: contact data and devices.")
    get.add_argument("id", metavar="USER")
    put = leaf(
        users,
        "put",
        _users_put,
        "Create or replace a user's contact data, from options or --body JSON. A webhook "
        "without a secret keeps its secret or gets a new one, shown in the answer.",
    )
    put.add_argument("id", metavar="USER")
    put.add_argument("--email", metavar="ADDR")
    put.add_argument("--phone", metavar="E164", help="e.g. +14155550100")
    put.add_argument("--timezone", metavar="TZ", help="an IANA name (default UTC)")
    put.add_argument("--locale", metavar="TAG", help="e.g. en-GB (default en)")
    put.add_argument("--webhook-url", metavar="URL")
    put.add_argument("--webhook-secret", metavar="SECRET", help="whsec_<base64>")
    put.add_argument("--body", metavar="JSON", help="the whole body (docs/API.md)")
    delete = leaf(
        users,
        "delete",
        _users_delete,
        "Erase a user (GDPR): registry rows, feed, statuses, parked runs, batch windows and "
        "dead letters. The log's records expire with their retention.",
    )
    delete.add_argument("id", metavar="USER")
    export = leaf(users, "export", _users_export, "Export everything held on a user, as JSON.")
    export.add_argument("id", metavar="USER")
    export.add_argument("--output", "-o", metavar="FILE", help="write to FILE, not stdout")
    export.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")

    events = family("events", "show what happened to an event")
    eshow = leaf(
        events,
        "show",
        _events_show,
        "Show an event's delivery status per recipient and channel: status, why, attempts "
        "and engagement.",
    )
    eshow.add_argument("id", metavar="EVENT_ID")
