"""One error vocabulary: every class carries a code, retriability and an HTTP status, codes are
unique, the protocol documentation lists each, and unexpected exceptions leak nothing."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from broker import errors
from broker import protocol as p

DOCS = Path(__file__).resolve().parents[3] / "docs" / "PROTOCOL.md"
ABSTRACT = {"herald_error", "protocol_error", "group_error"}


def concrete() -> list[type[BaseException]]:
    return [c for c in errors.all_error_classes() if c.code not in ABSTRACT]  # type: ignore[attr-defined]


def test_every_error_class_carries_code_retriable_and_status() -> None:
    for cls in errors.all_error_classes():
        code, retriable, status = cls.code, cls.retriable, cls.http_status  # type: ignore[attr-defined]
        assert isinstance(code, str) and code.islower(), cls
        assert isinstance(retriable, bool), cls
        assert isinstance(status, int) and 400 <= status <= 599, cls


def test_codes_are_unique_per_class() -> None:
    seen: dict[str, type[BaseException]] = {}
    for cls in concrete():
        code = cls.code  # type: ignore[attr-defined]
        assert code not in seen, f"{cls.__name__} and {seen[code].__name__} share {code!r}"
        seen[code] = cls


def test_the_protocol_documentation_lists_every_code() -> None:
    text = DOCS.read_text()
    missing = [c.code for c in concrete() if f"`{c.code}`" not in text]  # type: ignore[attr-defined]
    assert not missing, f"docs/PROTOCOL.md § Errors lacks {missing}"


@pytest.mark.parametrize(
    ("exc", "code", "status", "retriable"),
    [
        (errors.UnknownTopic("x"), "unknown_topic", 404, False),
        (errors.StorageFull("disk"), "storage_full", 507, True),
        (errors.LogOffline("fsync failed"), "log_offline", 503, False),
        (errors.Forbidden("no"), "forbidden", 403, False),
        (errors.ShuttingDown(), "shutting_down", 503, True),
        (errors.FrameTooLarge("big"), "frame_too_large", 413, False),
    ],
)
def test_describe_answers_from_the_class(
    exc: BaseException, code: str, status: int, retriable: bool
) -> None:
    info = errors.describe(exc)
    assert (info.code, info.http_status, info.retriable) == (code, status, retriable)
    assert errors.http_status_of(code) == status


def test_a_validation_error_names_the_field() -> None:
    class Body(msgspec.Struct):
        topic: str

    with pytest.raises(msgspec.ValidationError) as caught:
        msgspec.json.decode(b'{"topic": 3}', type=Body)
    info = errors.describe(caught.value)
    assert (info.code, info.http_status, info.field) == ("invalid_request", 400, "topic")


def test_an_unexpected_exception_is_internal_and_reveals_nothing() -> None:
    info = errors.describe(KeyError("/var/lib/herald/secret"))
    assert (info.code, info.http_status, info.retriable) == ("internal_error", 500, True)
    assert "/var/lib" not in info.message


def test_a_fatal_protocol_error_is_marked_so_the_connection_closes() -> None:
    decoder = p.FrameDecoder(max_frame_bytes=16)
    with pytest.raises(errors.FrameTooLarge) as caught:
        decoder.feed(b"\x00\x00\x01\x00")
    assert caught.value.fatal
    with pytest.raises(errors.BadFrame) as bad:
        p.decode_request(b"\x01")
    assert not bad.value.fatal
