"""The in-app channel's way into the log: appends to ``__inapp`` through the node's in-process
client (``broker/local.py``), ``acks=all``, so a delivery is ``delivered`` only once its message
is durable and visible to every gateway reader."""

from __future__ import annotations

import asyncio

from broker.client import Producer
from broker.events import EventIntake
from broker.local import LocalClient
from broker.service import BrokerService
from channels.inapp import INAPP_TOPIC


class InAppOutlet:
    """``append(key, value)`` for :class:`channels.inapp.InAppChannel`. Creates ``__inapp``
    (``partitions``) at once if it does not exist; the producer is made on first use."""

    def __init__(self, service: BrokerService, intake: EventIntake, partitions: int) -> None:
        service.topics.ensure_internal(INAPP_TOPIC, partitions)
        self.client = LocalClient(service, intake, client_id="herald-inapp")
        self._producer: Producer | None = None
        self._making: asyncio.Lock | None = None

    async def append(self, key: bytes, value: bytes) -> None:
        producer = self._producer
        if producer is None:
            if self._making is None:
                self._making = asyncio.Lock()
            async with self._making:
                if self._producer is None:
                    self._producer = await self.client.producer(acks=-1, linger_ms=0)
            producer = self._producer
        await producer.send(INAPP_TOPIC, value, key=key)

    async def close(self) -> None:
        if self._producer is not None:
            await self._producer.close()
        await self.client.close()
