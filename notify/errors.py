"""The notification API's errors: one class per kind of missing resource, each with its
stable code and HTTP status (``broker.errors.describe`` maps them like every Herald error).

Another tenant's user, event, workflow or dead letter is answered with the same error as a
missing one, so a key learns nothing of other tenants.
"""

from __future__ import annotations

from broker.errors import HeraldError


class UnknownResource(HeraldError):
    """A resource that does not exist in the caller's tenant (the base of the others; each
    kind of resource has its own code)."""

    code = "unknown_resource"
    retriable = False
    http_status = 404


class UnknownUser(UnknownResource):
    code = "unknown_user"


class UnknownDevice(UnknownResource):
    code = "unknown_device"


class UnknownSubscription(UnknownResource):
    code = "unknown_subscription"


class UnknownWorkflow(UnknownResource):
    code = "unknown_workflow"


class UnknownMandatory(UnknownResource):
    """``DELETE /admin/mandatory/{topic}`` of a topic that is not mandatory."""

    code = "unknown_mandatory_topic"


class UnknownEvent(UnknownResource):
    """No status is recorded for the event: unknown, another tenant's, not fanned out yet,
    or it reached nobody."""

    code = "unknown_event"


class UnknownNotification(UnknownResource):
    code = "unknown_notification"


class UnknownChannel(UnknownResource):
    """A channel this node does not run (``notify.channels``)."""

    code = "unknown_channel"


class UnknownDeadLetter(UnknownResource):
    code = "unknown_dead_letter"
