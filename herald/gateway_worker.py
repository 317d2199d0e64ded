"""``python -m herald.gateway_worker FD``: a gateway worker process (``gateway/worker.py``),
as the node starts it (``gateway.workers`` > 0), logging like the node (``[log]``) on the
stderr it inherits.

SIGINT is ignored: a Ctrl-C in the node's terminal reaches the whole process group, and the
node stops its workers itself (SIGTERM); a worker whose node is gone exits on its own.
"""

from __future__ import annotations

import asyncio
import signal
import sys

from broker.config import Config
from gateway.worker import run
from herald.logs import setup_logging


def _log_like_the_node(config: Config) -> None:
    setup_logging(config.log.level, config.log.format)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    setup_logging()  # until the node's config arrives
    asyncio.run(run(int(args[0]), on_config=_log_like_the_node))


if __name__ == "__main__":
    main()
