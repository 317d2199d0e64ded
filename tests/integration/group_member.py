"""One consumer-group member in its own process, so a test can SIGKILL it.

    python group_member.py HOST PORT TOPIC GROUP SESSION_TIMEOUT_MS NAME

Consumes with auto commit on every poll (a record is committed at the start of the poll after
the one that returned it, and on revocation), and prints one JSON object per line, flushed:

    {"event": "assigned", "partitions": [[partition, starting position], ...]}
    {"event": "revoked", "partitions": [partition, ...]}
    {"event": "consumed", "records": [[partition, offset], ...]}

SIGTERM: commit, leave the group and exit 0.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys

from broker.client import Client, Consumer, TopicPartition


def emit(obj: object) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def main(host: str, port: int, topic: str, group: str, session_ms: int, name: str) -> None:
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with await Client.connect(host, port, client_id=name) as client:

        def assigned(tps: list[TopicPartition]) -> None:
            # called once the starting positions (committed offsets) are known
            starts = [[tp[1], consumer.positions[tp]] for tp in tps]
            emit({"event": "assigned", "partitions": starts})

        def revoked(tps: list[TopicPartition]) -> None:
            emit({"event": "revoked", "partitions": [tp[1] for tp in tps]})

        consumer = Consumer(
            client,
            [topic],
            group=group,
            session_timeout_ms=session_ms,
            auto_commit_interval_ms=0,
            on_assign=assigned,
            on_revoke=revoked,
        )
        await consumer.start()
        emit({"event": "joined", "member_id": consumer.member_id})
        while not stop.is_set():
            recs = await consumer.getmany(timeout_ms=200)
            if recs:
                emit({"event": "consumed", "records": [[r.partition, r.offset] for r in recs]})
        await consumer.close()
    emit({"event": "closed"})


if __name__ == "__main__":
    h, port, t, g, st, n = sys.argv[1:7]
    asyncio.run(main(h, int(port), t, g, int(st), n))
