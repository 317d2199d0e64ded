"""The ``herald`` command line: ``herald serve`` runs a node; the other commands talk to a
running node, over its TCP protocol (``topics``, ``produce``, ``consume``, ``groups``) or its
HTTP API (``dlq``, ``users``, ``events``); see ``herald --help``."""

from __future__ import annotations

import argparse
import asyncio
import errno
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

if TYPE_CHECKING:
    from broker.config import Config


def _serve(args: argparse.Namespace, node_options: dict[str, Any] | None = None) -> int:
    """Run a node. ``node_options`` go to :class:`herald.node.Node` (tests plug a directory
    in this way; ``herald serve`` passes none)."""
    from broker.config import ConfigError, load_config
    from broker.errors import StateStoreFailed
    from herald.logs import setup_logging
    from herald.node import DataDirLocked, Node, install_signal_handlers

    try:
        cfg = load_config(Path(args.config) if args.config else None)
    except ConfigError as exc:
        print(f"herald: {exc}", file=sys.stderr)
        return 2
    listen = cfg.listen
    overrides = {
        "host": args.host,
        "http_port": args.http_port,
        "tcp_port": args.tcp_port,
        "ws_port": args.ws_port,
    }
    listen = msgspec.structs.replace(
        listen, **{k: v for k, v in overrides.items() if v is not None}
    )
    storage = cfg.storage
    if args.data_dir:
        storage = msgspec.structs.replace(storage, data_dir=args.data_dir)
    cfg = msgspec.structs.replace(cfg, listen=listen, storage=storage)
    setup_logging(cfg.log.level, cfg.log.format)
    from herald.malloc import keep_freed_memory

    keep_freed_memory()  # see broker/malloc.py: fresh pages cost a fault each
    from herald.collector import PauseLog, freeze_startup, tune_collector

    tune_collector()  # see herald/collector.py: fewer collections of short-lived objects
    PauseLog().install()  # and a collection that stops the loop past 20 ms is logged

    import uvloop

    from herald.stalls import StallLog

    async def main() -> None:
        node = Node(cfg, **(node_options or {}))
        install_signal_handlers(node)
        stalls = StallLog().start()  # a loop late by 20 ms or more is logged, with whose fault
        try:
            await node.run(lambda _node: freeze_startup())
        finally:
            stalls.stop()

    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(main())
    except (DataDirLocked, ConfigError) as exc:
        print(f"herald: {exc}", file=sys.stderr)
        return 2
    except StateStoreFailed as exc:
        print(f"herald: fatal: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise
        # a listener's port is taken (another node, another program): say which, no trace
        print(f"herald: cannot listen: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


def _token(args: argparse.Namespace) -> int:
    """Print a gateway token for USER, signed with the node's secret (``gateway/auth.py``):
    the configured ``gateway.token-secret``, else ``<data-dir>/gateway.secret`` (made here
    if the node has not started yet, exactly as the node would make it)."""
    import time

    from broker.config import ConfigError, load_config
    from gateway.auth import load_or_create_secret, mint

    try:
        cfg = load_config(Path(args.config) if args.config else None)
    except ConfigError as exc:
        print(f"herald: {exc}", file=sys.stderr)
        return 2
    data_dir = Path(args.data_dir or cfg.storage.data_dir)
    try:
        secret = load_or_create_secret(data_dir, cfg.gateway.token_secret)
        token = mint(secret, args.user, tenant=args.tenant, now_s=int(time.time()), ttl_s=args.ttl)
    except (OSError, ValueError) as exc:
        print(f"herald: {exc}", file=sys.stderr)
        return 1 if isinstance(exc, OSError) else 2
    print(token)
    return 0


def health_url(cfg: Config) -> str:
    """The ``/healthz`` address of the node ``cfg`` configures, seen from its own host: a
    wildcard listen address is reached on loopback; HTTPS when TLS is on."""
    host = cfg.listen.host
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    scheme = "https" if cfg.tls.enabled else "http"
    return f"{scheme}://{host}:{cfg.listen.http_port}/healthz"


def _health(args: argparse.Namespace) -> int:
    """Ask a node's ``/healthz`` (the address its config gives, or ``--url``) and print
    the answer: exit 0 when it is ok, 1 when it is degraded or cannot be reached, 2 for a
    bad config or certificate file. For container health checks and probes beside the node."""
    import json
    import ssl
    import urllib.error
    import urllib.request

    from broker.config import ConfigError, load_config

    url = args.url
    own_cert: str | None = None
    if url is None:
        try:
            cfg = load_config(Path(args.config) if args.config else None)
        except ConfigError as exc:
            print(f"herald: {exc}", file=sys.stderr)
            return 2
        url = health_url(cfg)
        own_cert = cfg.tls.cert_file
    context = None
    if url.startswith("https:"):
        # a probe beside the node reaches it on loopback, which its certificate need not
        # name; the certificate is still verified: against --ca-file, else against the
        # node's own certificate file from the config (the node must present exactly that
        # one: it is trusted as an anchor, partial chain), else the system's CAs
        from broker.tls import client_context

        try:
            context = client_context(args.ca_file)
            if args.ca_file is None and own_cert is not None:
                context.load_verify_locations(own_cert)
                context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
        except (OSError, ssl.SSLError) as exc:
            print(f"herald: cannot load {args.ca_file or own_cert}: {exc}", file=sys.stderr)
            return 2
        context.check_hostname = False
    try:
        with urllib.request.urlopen(url, timeout=args.timeout, context=context) as resp:
            status, body = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read()
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        print(f"herald: cannot reach {url}: {reason}", file=sys.stderr)
        return 1
    try:
        shown = json.dumps(json.loads(body), sort_keys=True)
    except ValueError:
        shown = body.decode("utf-8", "replace")
    print(shown)
    return 0 if status == 200 else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="herald",
        description="Herald: notifications platform and durable pub-sub broker.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = sub.add_parser(
        "serve",
        help="run a Herald node",
        description="Run a Herald node. Without --config: data in ./data, HTTP 8080, "
        "TCP 9092, WebSocket 8765, bound to 127.0.0.1.",
    )
    serve.add_argument("--config", metavar="FILE", help="TOML config (see config.example.toml)")
    serve.add_argument("--data-dir", metavar="DIR", help="override storage.data-dir")
    serve.add_argument("--host", metavar="H", help="override listen.host")
    serve.add_argument("--http-port", type=int, metavar="N", help="override listen.http-port")
    serve.add_argument("--tcp-port", type=int, metavar="N", help="override listen.tcp-port")
    serve.add_argument("--ws-port", type=int, metavar="N", help="override listen.ws-port")
    serve.set_defaults(func=_serve)
    token = sub.add_parser(
        "token",
        help="print a WebSocket gateway token for a user",
        description="Print an HS256 token for USER, signed with the node's secret "
        "(gateway.token-secret, else <data-dir>/gateway.secret). Clients pass it as "
        "ws://HOST:WS_PORT/?token=... or in their first message.",
    )
    token.add_argument("user", metavar="USER", help="the user id (the token's sub)")
    token.add_argument("--tenant", default="default", help="the user's tenant (default: default)")
    token.add_argument(
        "--ttl", type=int, default=3600, metavar="SECONDS", help="validity (default 3600)"
    )
    where = token.add_mutually_exclusive_group()
    where.add_argument("--data-dir", metavar="DIR", help="the node's data directory")
    where.add_argument("--config", metavar="FILE", help="the node's TOML config")
    token.set_defaults(func=_token)
    health = sub.add_parser(
        "health",
        help="check a node's /healthz: exit 0 when ok, 1 when not",
        description="Ask the node's /healthz and print its answer. The address comes from "
        "the config (listen.host and listen.http-port; HTTPS when TLS is on; a wildcard "
        "host is reached on loopback) or --url. Exit 0: ok; 1: degraded or unreachable; "
        "2: a bad config or certificate file. For container health checks: herald health "
        "--config FILE.",
    )
    health.add_argument("--config", metavar="FILE", help="the node's TOML config")
    health.add_argument("--url", metavar="URL", help="the /healthz URL (instead of --config)")
    health.add_argument("--timeout", type=float, default=3.0, metavar="SECONDS", help="(default 3)")
    health.add_argument(
        "--ca-file",
        metavar="FILE",
        help="CA to verify an HTTPS node by (default: the node's own certificate, from "
        "--config; else the system's CAs)",
    )
    health.set_defaults(func=_health)
    try:
        from herald import cli_client, cli_http
    except ImportError:  # pragma: no cover - during bootstrap only
        pass
    else:
        cli_client.add_commands(sub)
        cli_http.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
