"""Where an append's acknowledgement is decided: the port the cluster's replication plugs into.

The broker's front door (:meth:`broker.service.BrokerService.produce`) asks :class:`Replication`
which future an append must wait for before it is acknowledged, given the producer's ``acks``.
On a single node the answer is the partition's own write or fsync; in a cluster the
implementation will also wait for the in-sync followers (``acks=all``) without any transport
changing.
"""

from __future__ import annotations

import asyncio
from typing import Literal, Protocol

from storage.partition import Partition

Acks = Literal[0, 1, -1]


class Replication(Protocol):
    def ack_future(
        self, partition: Partition, end_offset: int, acks: Acks
    ) -> asyncio.Future[None] | None:
        """The future to await before acknowledging an append that ends at ``end_offset``
        (exclusive), or None when the acknowledgement may go out now. The future fails with
        the storage error (``StorageFull``, ``LogOffline``) if the append does."""
        ...


class LocalReplication:
    """One node, no replicas.

    - ``acks=0``: answer at once (the append is queued in memory; a worker thread writes it).
    - ``acks=1``: answer once it is written to the page cache (lost on a power cut, not on
      a killed process).
    - ``acks=-1`` (all): answer once it is fdatasync'd: it survives a power cut.
    """

    def ack_future(
        self, partition: Partition, end_offset: int, acks: Acks
    ) -> asyncio.Future[None] | None:
        if acks == -1:
            return partition.durable_future(end_offset)
        if acks == 1:
            return partition.written_future(end_offset)
        return None
