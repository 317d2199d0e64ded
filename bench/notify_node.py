"""``herald serve`` with the benchmark's computed audience (``bench/notify_audience.py``):
every user's webhook goes to ``<base>/hook/<user>``::

    python -m bench.notify_node <receiver base url> <channel> [--trace FILE] [serve options]

``--trace FILE``: time each event's stage boundaries (``bench/notify_trace.py``) and write
them to FILE at exit.
"""

from __future__ import annotations

import sys

from bench.notify_audience import Audience
from herald import cli


def main() -> int:
    base, channel, *rest = sys.argv[1:]
    if rest[:1] == ["--trace"]:
        from bench import notify_trace

        notify_trace.install(rest[1])
        rest = rest[2:]
    args = cli.build_parser().parse_args(["serve", *rest])
    return cli._serve(args, {"directory": lambda kv: Audience(channel, base)})


if __name__ == "__main__":
    sys.exit(main())
