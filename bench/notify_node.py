"""``herald serve`` with the benchmark's computed audience (``bench/notify_audience.py``):
every user's webhook goes to ``<base>/hook/<user>``::

    python -m bench.notify_node <receiver base url> <channel> [serve options]
"""

from __future__ import annotations

import sys

from bench.notify_audience import Audience
from herald import cli


def main() -> int:
    base, channel, *rest = sys.argv[1:]
    args = cli.build_parser().parse_args(["serve", *rest])
    return cli._serve(args, {"directory": lambda kv: Audience(channel, base)})


if __name__ == "__main__":
    sys.exit(main())
