"""Client commands of the ``herald`` CLI: ``topics``, ``produce``, ``consume``, ``groups``.

Every command talks to a running node over the TCP protocol with :class:`broker.client.Client`;
what it prints is shaped by the pure functions of ``broker/cli_format.py``. Expected failures
(nothing listening, an error answered by the node, bad usage) become one line on stderr and an
exit status: 1 for a failed operation, 2 for bad usage, 130 for Ctrl-C. Tracebacks are for
bugs only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import ssl
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import AsyncGenerator, Awaitable, Callable
from pathlib import Path
from typing import Any, BinaryIO, Literal

import msgspec

from broker import errors
from broker import protocol as p
from broker.client import BrokerError, Client, ConnectionLost, Consumer, RecordMetadata
from herald import cli_format as fmt

_ACKS: dict[str, p.Acks] = {"0": 0, "1": 1, "all": -1}
# Backpressure for `produce`: records queued but not yet acknowledged. Bounds the memory a fast
# reader can pin: about the bytes limit plus ~200 bytes of bookkeeping per record.
_MAX_UNACKED_RECORDS = 100_000
_MAX_UNACKED_BYTES = 64 * 1024 * 1024
_READ_SIZE = 64 * 1024  # bytes per read of stdin or --file


# the environment variable the CLI reads an API key from when no option gives one
API_KEY_ENV = "HERALD_API_KEY"


def _api_key(args: argparse.Namespace) -> str | None:
    """The key from ``--api-key``, else the first line of ``--api-key-file``, else the
    ``HERALD_API_KEY`` environment variable, else none."""
    if args.api_key:
        return str(args.api_key)
    if args.api_key_file:
        try:
            text = Path(args.api_key_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"--api-key-file: cannot read {args.api_key_file}: {exc}") from None
        key = text.strip().splitlines()[0].strip() if text.strip() else ""
        if not key:
            raise UsageError(f"--api-key-file: {args.api_key_file} is empty")
        return key
    return os.environ.get(API_KEY_ENV) or None


def _ssl_context(args: argparse.Namespace) -> ssl.SSLContext | None:
    if args.ca_file is None and not args.tls:
        return None
    from broker.tls import client_context

    try:
        return client_context(args.ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(f"--ca-file: cannot load {args.ca_file}: {exc}") from None


class UsageError(Exception):
    """Options that parse but do not combine (exit status 2, as argparse's own errors)."""


class CannotConnect(Exception):
    """Nothing answered at the bootstrap address (the usual cause: no node running)."""


def _print(args: argparse.Namespace, obj: Any, text: str) -> None:
    """``obj`` as one line of JSON with ``--json``, else ``text``."""
    print(msgspec.json.encode(obj).decode() if args.json else text)


class _Acks:
    """Acknowledged records, counted by a done-callback on each record's future (which also
    retrieves a failure, so none is reported as 'never retrieved')."""

    def __init__(self) -> None:
        self.records = 0
        self.partitions: Counter[int] = Counter()
        self.error: Exception | None = None

    def __call__(self, fut: asyncio.Future[RecordMetadata]) -> None:
        if fut.cancelled():
            return
        exc = fut.exception()
        if exc is None:
            self.records += 1
            self.partitions[fut.result().partition] += 1
        elif self.error is None and isinstance(exc, Exception):
            self.error = exc


# ------------------------------------------------------------------------ commands
async def _topics_create(client: Client, args: argparse.Namespace) -> int:
    # a raw request rather than Client.create_topic, to report whether it was created
    req = p.CreateTopic(
        id=0,
        topic=args.name,
        partitions=args.partitions,
        retention_ms=args.retention_ms,
        retention_bytes=args.retention_bytes,
        exist_ok=args.exist_ok,
    )
    resp = await client.request(req)
    assert isinstance(resp, p.TopicCreated)
    verb = "created" if resp.created else "exists:"
    text = f"{verb} topic {args.name} with {len(resp.topic.partitions)} partitions"
    _print(args, {"created": resp.created, "topic": resp.topic}, text)
    return 0


async def _topics_list(client: Client, args: argparse.Namespace) -> int:
    topics = await client.metadata()
    _print(args, topics, fmt.topics_table(topics) if topics else "no topics")
    return 0


async def _topics_describe(client: Client, args: argparse.Namespace) -> int:
    (topic,) = await client.metadata([args.name])
    _print(args, topic, fmt.topic_description(topic))
    return 0


async def _topics_delete(client: Client, args: argparse.Namespace) -> int:
    await client.delete_topic(args.name)
    _print(args, {"deleted": args.name}, f"deleted topic {args.name}")
    return 0


async def _line_chunks(stream: BinaryIO) -> AsyncGenerator[list[bytes], None]:
    """Complete lines of ``stream`` as they arrive. A daemon thread does the blocking reads: a
    read waiting on a terminal or a pipe must neither stall the loop (the producer's linger
    timers run on it) nor keep the process alive after Ctrl-C, as an executor thread would."""
    loop = asyncio.get_running_loop()
    chunks: asyncio.Queue[bytes | OSError] = asyncio.Queue()
    slots = threading.Semaphore(16)  # read-ahead: at most 16 chunks
    read = getattr(stream, "read1", stream.read)

    def pump() -> None:
        while True:
            slots.acquire()
            try:
                chunk: bytes | OSError = read(_READ_SIZE)
            except OSError as exc:
                chunk = exc
            try:
                loop.call_soon_threadsafe(chunks.put_nowait, chunk)
            except RuntimeError:  # the loop is closed: nobody reads any more
                return
            if isinstance(chunk, OSError) or not chunk:
                return

    threading.Thread(target=pump, name="herald-cli-reader", daemon=True).start()
    buf = bytearray()
    while True:
        chunk = await chunks.get()
        slots.release()
        if isinstance(chunk, OSError):
            raise chunk
        if not chunk:
            break
        buf += chunk
        if b"\n" in chunk:
            yield fmt.take_lines(buf)
    if buf:
        yield fmt.take_lines(buf + b"\n")


async def _record_source(args: argparse.Namespace) -> AsyncGenerator[list[bytes], None]:
    if args.count is not None:
        for values in fmt.synthetic_values(args.count, args.size or 100):
            yield values
            await asyncio.sleep(0)  # let acks and linger timers run between chunks
    elif args.values:
        yield [v.encode() for v in args.values]
    elif args.file is not None:
        with open(args.file, "rb") as f:
            async for lines in _line_chunks(f):
                yield lines
    else:
        if sys.stdin.isatty() and not args.quiet:
            print("reading records from stdin, one per line; Ctrl-D ends", file=sys.stderr)
        async for lines in _line_chunks(sys.stdin.buffer):
            yield lines


def _check_produce(args: argparse.Namespace) -> None:
    if sum([args.count is not None, bool(args.values), args.file is not None]) > 1:
        raise UsageError("give records one way: VALUE arguments, --file or --count")
    if args.size is not None and args.count is None:
        raise UsageError("--size needs --count")


async def _produce(client: Client, args: argparse.Namespace) -> int:
    key = None if args.key is None else args.key.encode()
    total = args.count if args.count is not None else len(args.values) or None
    progress = fmt.Progress(total, tty=sys.stderr.isatty(), started=time.monotonic())
    acks = _Acks()
    producer = await client.producer(acks=_ACKS[args.acks])
    unacked: deque[tuple[asyncio.Future[RecordMetadata], int]] = deque()
    unacked_bytes = sent_bytes = 0
    started = time.monotonic()
    async with contextlib.aclosing(_record_source(args)) as source:
        async for values in source:
            for value in values:
                fut = producer.send_nowait(args.topic, value, key=key, partition=args.partition)
                fut.add_done_callback(acks)
                unacked.append((fut, len(value)))
                unacked_bytes += len(value)
                sent_bytes += len(value)
                if len(unacked) > _MAX_UNACKED_RECORDS or unacked_bytes > _MAX_UNACKED_BYTES:
                    # drain to half, not by one: refilling in small steps makes small batches
                    while (
                        len(unacked) > _MAX_UNACKED_RECORDS // 2
                        or unacked_bytes > _MAX_UNACKED_BYTES // 2
                    ):
                        oldest, size = unacked.popleft()
                        unacked_bytes -= size
                        if not oldest.done():
                            await asyncio.wait([oldest])
            if not args.quiet and (line := progress.update(acks.records, time.monotonic())):
                sys.stderr.write(line)
            if acks.error is not None:
                break
    await producer.flush()
    if unacked:
        # flush returns once every record is answered, but the futures' done callbacks
        # (``acks``, which counts them) run in a later loop turn: wait for those too
        await asyncio.wait([fut for fut, _ in unacked])
    if not args.quiet and (line := progress.finish()):
        sys.stderr.write(line)
    if acks.error is not None:
        print(f"herald: stopped after {acks.records} acknowledged records", file=sys.stderr)
        raise acks.error
    seconds = time.monotonic() - started
    summary = fmt.produce_summary(args.topic, acks.records, sent_bytes, seconds, acks.partitions)
    _print(args, summary, fmt.produce_summary_text(summary))
    return 0


def _check_consume(args: argparse.Namespace) -> None:
    if args.offset is not None and args.partition is None:
        raise UsageError("--offset needs --partition")
    if args.group is not None and args.partition is not None:
        raise UsageError("--partition picks a partition by hand; it does not combine with --group")


async def _open_consumer(client: Client, args: argparse.Namespace) -> Consumer:
    start: Literal["earliest", "latest"] = "latest" if args.start == "latest" else "earliest"
    if args.partition is None:
        return await client.consumer(
            args.topic, group=args.group, auto_commit=False, auto_offset_reset=start
        )
    # one partition chosen by hand: no group; the position comes from --offset or --from
    n = await client.partition_count(args.topic, refresh=True)
    if n is None:
        raise BrokerError(errors.UnknownTopic.code, f"unknown topic {args.topic!r}")
    if args.partition >= n:
        raise BrokerError(errors.UnknownPartition.code, f"{args.topic!r} has partitions 0..{n - 1}")
    offset = args.offset
    if offset is None:
        offset = await client.list_offsets(args.topic, args.partition, start)
    consumer = Consumer(client, [args.topic], auto_offset_reset=start)
    await consumer.assign([(args.topic, args.partition)])
    consumer.seek(args.topic, args.partition, offset)
    return consumer


async def _consume(client: Client, args: argparse.Namespace) -> int:
    consumer = await _open_consumer(client, args)
    loop = asyncio.get_running_loop()
    idle = args.timeout_ms / 1000
    deadline = loop.time() + idle
    count = 0
    try:
        while args.max is None or count < args.max:
            wait_ms = 1000 if args.follow else int((deadline - loop.time()) * 1000)
            if wait_ms <= 0:
                break
            left = None if args.max is None else args.max - count
            batch = await consumer.getmany(timeout_ms=wait_ms, max_records=left)
            if not batch:
                continue
            sys.stdout.write("".join(fmt.record_line(r, args.json) for r in batch))
            sys.stdout.flush()
            count += len(batch)
            if args.group is not None:
                # commit what was written, and only that: a failed write raises before this
                await consumer.commit()
            deadline = loop.time() + idle
    finally:
        await consumer.close()
    return 0


async def _groups_list(client: Client, args: argparse.Namespace) -> int:
    groups = await client.list_groups()
    _print(args, groups, "\n".join(groups) if groups else "no groups")
    return 0


async def _groups_describe(client: Client, args: argparse.Namespace) -> int:
    info = await client.describe_group(args.group)
    _print(args, info, fmt.group_description(info))
    return 0


Command = Callable[[Client, argparse.Namespace], Awaitable[int]]


def _runner(
    command: Command, check: Callable[[argparse.Namespace], None] | None = None
) -> Callable[[argparse.Namespace], int]:
    """argparse's ``func`` for ``command``: check the options, connect, run on uvloop, and
    turn expected failures into one line on stderr and an exit status."""

    def run(args: argparse.Namespace) -> int:
        import uvloop

        host, port = args.bootstrap
        where = f"{host}:{port}"
        try:
            api_key = _api_key(args)
            ssl_context = _ssl_context(args)
        except UsageError as exc:
            print(f"herald: {exc}", file=sys.stderr)
            return 2

        async def main() -> int:
            try:
                client = await Client.connect(
                    host,
                    port,
                    api_key=api_key,
                    client_id="herald-cli",
                    connect_timeout=5,
                    ssl=ssl_context,
                )
            except ssl.SSLError as exc:
                raise CannotConnect(
                    f"cannot connect to {where} over TLS: {exc.reason or exc} "
                    "(is the node's certificate signed by --ca-file, for this host name?)"
                ) from None
            except (OSError, TimeoutError) as exc:
                why = exc.strerror if isinstance(exc, OSError) and exc.strerror else "timed out"
                raise CannotConnect(
                    f"cannot connect to {where}: is `herald serve` running? ({why.lower()})"
                ) from None
            async with client:
                return await command(client, args)

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
        except ConnectionLost as exc:
            print(f"herald: lost the connection to {where}: {exc.message}", file=sys.stderr)
        except BrokerError as exc:
            hint = (
                " (give one with --api-key, --api-key-file or HERALD_API_KEY)"
                if exc.code == errors.Unauthenticated.code
                else ""
            )
            print(f"herald: {exc.code}: {exc.message}{hint}", file=sys.stderr)
        except BrokenPipeError:
            # the reader went away (`herald consume ... | head`): stop quietly, and point
            # stdout at /dev/null so the interpreter's last flush does not fail again
            with contextlib.suppress(OSError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except OSError as exc:  # e.g. --file does not exist
            print(f"herald: {exc}", file=sys.stderr)
        except KeyboardInterrupt:
            return 130
        return 1

    return run


def add_commands(subparsers: Any) -> None:
    """Add ``topics``, ``produce``, ``consume`` and ``groups`` to ``herald``'s subparsers."""
    common = argparse.ArgumentParser(add_help=False)
    opts = common.add_argument_group("connection and output")
    opts.add_argument(
        "--bootstrap",
        type=fmt.parse_bootstrap,
        default="127.0.0.1:9092",
        metavar="HOST:PORT",
        help="the node's TCP address (default: 127.0.0.1:9092)",
    )
    keys = opts.add_mutually_exclusive_group()
    keys.add_argument(
        "--api-key",
        metavar="KEY",
        help=f"API key, when the node requires one (visible to other users of this machine "
        f"in the process list: prefer --api-key-file or {API_KEY_ENV})",
    )
    keys.add_argument(
        "--api-key-file",
        metavar="FILE",
        help="read the API key from FILE (its first line)",
    )
    opts.add_argument(
        "--tls",
        action="store_true",
        help="connect over TLS, verifying the node against the system's trusted CAs",
    )
    opts.add_argument(
        "--ca-file",
        metavar="FILE",
        help="connect over TLS, verifying the node's certificate against the CAs in FILE (PEM)",
    )
    opts.add_argument("--json", action="store_true", help="machine-readable JSON output")

    def leaf(parent: Any, name: str, command: Command, text: str, **kw: Any) -> Any:
        first = text.replace(":", ".").split(".")[0]
        summary = first[0].lower() + first[1:]
        sp = parent.add_parser(name, parents=[common], help=summary, description=text)
        sp.set_defaults(func=_runner(command, **kw))
        return sp

    def family(name: str, text: str) -> Any:
        parser = subparsers.add_parser(name, help=text, description=text.capitalize() + ".")
        return parser.add_subparsers(dest=f"{name}_command", required=True, metavar="ACTION")

    topics = family("topics", "create, list, describe and delete topics")
    create = leaf(topics, "create", _topics_create, "Create a topic.")
    create.add_argument("name", metavar="NAME")
    create.add_argument(
        "--partitions", type=fmt.natural, metavar="N", help="default: the node's topics.partitions"
    )
    create.add_argument(
        "--retention-ms", type=fmt.natural, metavar="MS", help="delete records older than MS ms"
    )
    create.add_argument(
        "--retention-bytes",
        type=fmt.natural,
        metavar="B",
        help="keep at most B bytes a partition",
    )
    create.add_argument("--exist-ok", action="store_true", help="succeed if the topic exists")
    leaf(topics, "list", _topics_list, "List topics with their record counts and sizes.")
    describe = leaf(topics, "describe", _topics_describe, "Describe a topic's partitions.")
    describe.add_argument("name", metavar="NAME")
    delete = leaf(topics, "delete", _topics_delete, "Delete a topic and all its records.")
    delete.add_argument("name", metavar="NAME")

    produce = leaf(
        subparsers,
        "produce",
        _produce,
        "Send records to a topic: the VALUE arguments, else one record per line of --file or "
        "stdin, or --count synthetic records for load. Prints a summary, and on runs longer "
        "than a second a progress line on stderr.",
        check=_check_produce,
    )
    produce.add_argument("topic", metavar="TOPIC")
    produce.add_argument("values", nargs="*", metavar="VALUE", help="record values to send")
    produce.add_argument("--file", metavar="F", help="read one record per line from F")
    produce.add_argument("--key", metavar="K", help="key of every record (picks the partition)")
    produce.add_argument("--partition", type=fmt.natural, metavar="P", help="send to partition P")
    produce.add_argument(
        "--acks",
        choices=list(_ACKS),
        default="all",
        help="all: acknowledged once fsynced (default); 0 or 1: once in the page cache",
    )
    produce.add_argument("--count", type=fmt.natural, metavar="N", help="send N synthetic records")
    produce.add_argument("--size", type=fmt.natural, metavar="B", help="of B bytes (default 100)")
    produce.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")

    consume = leaf(
        subparsers,
        "consume",
        _consume,
        "Print records of a topic, one per line. Stops after --max records, or --timeout-ms "
        "without a new one unless --follow. With --group, the group's committed offsets say "
        "where to start, and offsets are committed once the records are written.",
        check=_check_consume,
    )
    consume.add_argument("topic", metavar="TOPIC")
    consume.add_argument("--group", metavar="G", help="consume as a member of group G")
    start = consume.add_mutually_exclusive_group()
    start.add_argument(
        "--from",
        dest="start",
        choices=["earliest", "latest"],
        help="where to start without a committed offset (default: earliest)",
    )
    start.add_argument("--offset", type=fmt.natural, metavar="O", help="start at offset O")
    consume.add_argument("--partition", type=fmt.natural, metavar="P", help="only partition P")
    consume.add_argument("--max", type=fmt.natural, metavar="N", help="stop after N records")
    consume.add_argument(
        "--timeout-ms",
        type=fmt.natural,
        default=2000,
        metavar="T",
        help="stop after T ms without a new record (default: 2000)",
    )
    consume.add_argument("--follow", "-f", action="store_true", help="wait for new records")

    groups = family("groups", "list and describe consumer groups")
    leaf(groups, "list", _groups_list, "List consumer groups.")
    gdescribe = leaf(
        groups,
        "describe",
        _groups_describe,
        "Describe a group: its members and their assignment, and per partition the committed "
        "offset, the high watermark and the lag.",
    )
    gdescribe.add_argument("group", metavar="GROUP")
