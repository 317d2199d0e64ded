"""``herald serve`` with the test-only :class:`SyntheticDirectory` (a computed audience whose
webhooks go to a receiver in the test process), for crash tests that SIGKILL the node::

    python -m tests.integration.notify.node_main <receiver base url> [serve options]
"""

from __future__ import annotations

import sys

from herald import cli
from tests.integration.notify.support import SyntheticDirectory


def main() -> int:
    base, *rest = sys.argv[1:]
    args = cli.build_parser().parse_args(["serve", *rest])
    return cli._serve(args, {"directory": lambda kv: SyntheticDirectory(base)})


if __name__ == "__main__":
    sys.exit(main())
