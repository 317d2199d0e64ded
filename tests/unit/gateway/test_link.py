"""The worker link's message stream (``gateway/link.py``): :class:`Splitter` gives back every
whole message of what was read, in order, whatever the reads' boundaries, and refuses a
length past the bound before buffering it."""

from __future__ import annotations

import pytest

from gateway import link


def messages() -> list[link.ToWorker]:
    return [
        link.Push(1, "t", "u1", b'{"type":"notification","id":"a"}'),
        link.Write("t", "u1", b'{"type":"counts","unseen":1,"unread":1}'),
        link.Broadcast(2, "t", b'{"type":"notification","id":"b"}', ["u9"]),
        link.Tell(7, b"x" * 70_000),
    ]


def test_a_stream_cut_anywhere_gives_back_every_message_in_order() -> None:
    stream = b"".join(link.encode(m) for m in messages())
    for step in (1, 3, 4, 5, 1000, len(stream)):
        splitter = link.Splitter()
        got: list[link.ToWorker] = []
        for i in range(0, len(stream), step):
            got += [link.decode_to_worker(b) for b in splitter.feed(stream[i : i + step])]
        assert got == messages(), step
    # several whole messages and part of the next in one read
    splitter = link.Splitter()
    first = splitter.feed(stream[: len(stream) - 10])
    assert [link.decode_to_worker(b) for b in first] == messages()[:3]
    assert [link.decode_to_worker(b) for b in splitter.feed(stream[-10:])] == messages()[3:]


def test_a_length_past_the_bound_is_refused_from_its_header() -> None:
    splitter = link.Splitter()
    with pytest.raises(link.LinkError):
        splitter.feed((link.MAX_MESSAGE_BYTES + 1).to_bytes(4, "big") + b"xx")
