"""The rules for names a client chooses: consumer groups, client ids and member ids (topic
names are :mod:`broker.topics`'s). Pure: no I/O.

Why bounded: a name is kept in memory, in state-store keys (``tenant/group \\0 topic \\0
partition``), in log lines and in metric labels, and is echoed in error messages. A NUL
would split a stored key in the wrong place (and broke ``describe_group`` and ``/metrics``
for everyone); a newline would forge log lines; a 1 MiB name costs 1 MiB per copy. So each
name has a length cap and a character set, and a name outside them is refused with an error
that names the field, before anything is stored.
"""

from __future__ import annotations

import re
from typing import Final

from broker.errors import InvalidGroup, InvalidRequest

MAX_GROUP_CHARS: Final = 200
MAX_CLIENT_ID_CHARS: Final = 100
MAX_MEMBER_ID_CHARS: Final = 200

# group names: what Kafka users write (``billing.invoices_v2``, ``connect-sink:eu@prod``),
# no spaces, no '/' (it separates the tenant in stored keys and the path in GET /groups/{g})
_GROUP: Final = re.compile(rf"[A-Za-z0-9._:@+=-]{{1,{MAX_GROUP_CHARS}}}")
# client and member ids are labels: printable ASCII, spaces allowed, nothing else
_LABEL: Final = re.compile(r"[\x20-\x7e]*")
GROUP_RULE: Final = (
    f"1-{MAX_GROUP_CHARS} characters of letters, digits and '.', '_', '-', ':', '@', '+', '='"
)


def shown(name: str, limit: int = 64) -> str:
    """``name`` as an error message may quote it: at most ``limit`` characters, so that a
    refused 1 MiB name is not echoed back whole."""
    return repr(name if len(name) <= limit else name[:limit] + "...")


def validate_group(name: str, *, field: str = "group") -> str:
    """``name`` if it is a valid group name; else :class:`InvalidGroup` naming ``field``."""
    if not _GROUP.fullmatch(name):
        raise InvalidGroup(f"invalid group name {shown(name)}: use {GROUP_RULE}", field=field)
    return name


def validate_client_id(client_id: str, *, field: str = "client_id") -> str:
    if len(client_id) > MAX_CLIENT_ID_CHARS or not _LABEL.fullmatch(client_id):
        raise InvalidRequest(
            f"client_id must be at most {MAX_CLIENT_ID_CHARS} printable ASCII characters",
            field=field,
        )
    return client_id


def validate_member_id(member_id: str, *, field: str = "member_id") -> str:
    if not 0 < len(member_id) <= MAX_MEMBER_ID_CHARS or not _LABEL.fullmatch(member_id):
        raise InvalidRequest(
            f"member_id must be 1-{MAX_MEMBER_ID_CHARS} printable ASCII characters", field=field
        )
    return member_id
