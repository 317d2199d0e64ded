"""Routes over the registry: users (and their export and erasure), devices, subscriptions,
subscribers, preferences, tenant defaults, mandatory topics, consent, workflows
(``docs/API.md``). Plumbing in ``notify/api_base.py``."""

from __future__ import annotations

from typing import Any

import msgspec

from broker.errors import InvalidRequest
from broker.openapi import Param, Route
from notify.api_base import READ, WRITE, Api, Call
from notify.api_engine import feed_item, letter_out
from notify.api_model import (
    BatchOut,
    ConsentEntryOut,
    ConsentIn,
    ConsentOut,
    ConsentStateOut,
    ContactEventOut,
    Deleted,
    DeviceOut,
    Erased,
    ExportOut,
    MandatoryOut,
    MandatoryTopics,
    ParkedOut,
    PreferencesOut,
    SubscriberOut,
    SubscribersPage,
    SubscriptionOut,
    SubscriptionsPage,
    UserOut,
    WebhookOut,
    WorkflowOut,
    answer,
)
from notify.errors import (
    UnknownDevice,
    UnknownMandatory,
    UnknownSubscription,
    UnknownUser,
    UnknownWorkflow,
)
from notify.model import (
    Consent,
    Device,
    Preferences,
    Profile,
    StoredPreferences,
    StoredSubscription,
    Subscription,
    User,
    Workflow,
)
from notify.registry import MAX_PAGE, MAX_TOPIC_BYTES, MAX_USER_BYTES

USER = {"user": "the user's id in your tenant (1-200 bytes)"}
TOPIC = {"topic": "a notification topic (1-200 bytes)"}
PAGE = (
    Param("after", str, "the next_after of the previous page"),
    Param("limit", int, f"items per page (default 100, at most {MAX_PAGE})", minimum=1,
          maximum=MAX_PAGE),
)  # fmt: skip


def user_out(user: str, profile: Profile, *, secrets: bool) -> UserOut:
    c = profile.contact
    hook = None
    if c is not None and c.webhook is not None:
        w = c.webhook
        hook = WebhookOut(
            url=w.url,
            secret=w.secret if secrets else None,
            previous_secret_until_ms=max((r.until_ms for r in w.retired), default=None),
            disabled_ms=w.disabled_ms,
            disabled_reason=w.disabled_reason,
        )
    return UserOut(
        id=user,
        email=c.email if c else None,
        phone=c.phone if c else None,
        timezone=c.timezone if c else "UTC",
        locale=c.locale if c else "en",
        webhook=hook,
        devices=[
            DeviceOut(
                token=t,
                platform=d.platform,
                added_ms=d.added_ms,
                invalid_since_ms=d.invalid_since_ms,
            )
            for t, d in profile.devices.items()
        ],
        created_ms=profile.created_ms,
        updated_ms=c.updated_ms if c else profile.created_ms,
        email_invalid_ms=c.email_invalid_ms if c else None,
        email_invalid_reason=c.email_invalid_reason if c else None,
    )


def sub_out(topic: str, s: StoredSubscription) -> SubscriptionOut:
    return SubscriptionOut(
        topic=topic,
        channels=list(s.channels),
        filter=s.filter,
        created_ms=s.created_ms,
        updated_ms=s.updated_ms,
    )


class RegistryHandlers:
    """The handlers (bound to one :class:`Api`)."""

    def __init__(self, api: Api) -> None:
        self.api = api
        self.reg = api.registry

    def _profile(self, call: Call) -> tuple[str, Profile]:
        user = call.id("user", MAX_USER_BYTES)
        profile = self.reg.profile(call.tenant, user)
        if profile is None:
            raise UnknownUser(f"no user {user!r}", field="user")
        return user, profile

    # ----------------------------------------------------------------------- users
    async def put_user(self, call: Call) -> UserOut:
        user = call.id("user", MAX_USER_BYTES)
        await self.reg.put_user(call.tenant, user, call.body, now_ms=self.api.clock())
        profile = self.reg.profile(call.tenant, user)
        assert profile is not None
        return user_out(user, profile, secrets=True)

    async def get_user(self, call: Call) -> UserOut:
        user, profile = self._profile(call)
        return user_out(user, profile, secrets="admin" in call.principal.scopes)

    async def enable_webhook(self, call: Call) -> UserOut:
        user, _profile = self._profile(call)
        if not await self.reg.enable_webhook(
            call.tenant, user, at_ms=self.api.clock(), source="api"
        ):
            raise InvalidRequest("the user has no webhook", field="user")
        profile = self.reg.profile(call.tenant, user)
        assert profile is not None
        return user_out(user, profile, secrets="admin" in call.principal.scopes)

    async def delete_user(self, call: Call) -> Erased:
        user = call.id("user", MAX_USER_BYTES)
        rows = await self.reg.erase_user(call.tenant, user)
        held, _gone = await self.api.engine.erase_user(call.tenant, user)
        if rows == 0 and held.empty() and held.feed_keys == 0:
            raise UnknownUser(f"no user {user!r}", field="user")
        return Erased(
            user=user,
            registry_rows=rows,
            notifications=len(held.notes),
            statuses=len(held.statuses) + len(held.paged),
            parked_runs=len(held.timers),
            batch_windows=len(held.batches),
            dead_letters=len(held.dead),
        )

    async def export_user(self, call: Call) -> ExportOut:
        user = call.id("user", MAX_USER_BYTES)
        tenant = call.tenant
        reg = self.reg.export_user(tenant, user)
        held = await self.api.engine.held_on(tenant, user)
        registry_empty = reg.profile is None and not reg.subscriptions and not reg.consent_ledger
        if registry_empty and held.empty() and held.feed_keys == 0:
            raise UnknownUser(f"no user {user!r}", field="user")
        profile = reg.profile
        statuses = []
        for key, row in held.statuses:
            _t, event_id, _u, channel = key.decode().split("\0")
            statuses.append({"event_id": event_id, "channel": channel, **msgspec.to_builtins(row)})
        for key, row in held.paged:  # a status page's key: tenant, event, channel, status, id
            _t, event_id, channel, _s, _first = key.decode().split("\0")
            statuses.append({"event_id": event_id, "channel": channel, **msgspec.to_builtins(row)})
        secrets = "admin" in call.principal.scopes
        return ExportOut(
            user=user,
            profile=user_out(user, profile, secrets=secrets) if profile is not None else None,
            preferences=answer(profile.preferences, PreferencesOut)
            if profile is not None and profile.preferences is not None
            else None,
            consent={c: answer(st, ConsentStateOut) for c, st in profile.consent.items()}
            if profile is not None
            else {},
            consent_ledger=[answer(e, ConsentEntryOut) for e in reg.consent_ledger],
            contact_log=[answer(e, ContactEventOut) for e in reg.contact_log],
            subscriptions=[sub_out(t, s) for t, s in sorted(reg.subscriptions.items())],
            cap_windows=reg.windows,
            notifications=[feed_item(user, key, note, tenant) for key, note in held.notes],
            statuses=statuses,
            parked_runs=[
                ParkedOut(
                    timer_id=t.timer_id,
                    kind=t.kind,
                    due_ms=t.due_ms,
                    event_id=t.event.event_id,
                    topic=t.event.topic,
                    data=msgspec.Raw(t.event.data),
                )
                for t in held.timers
            ],
            batch_windows=[
                BatchOut(
                    topic=slot.split("\0")[2],
                    closes_ms=b.closes_ms,
                    events=[m.event.event_id for m in members],
                )
                for slot, b, members in held.batches
            ],
            dead_letters=[letter_out(letter) for _k, letter in held.dead],
        )

    # --------------------------------------------------------------------- devices
    async def put_device(self, call: Call) -> DeviceOut:
        user = call.id("user", MAX_USER_BYTES)
        token = call.path["token"]
        d = await self.reg.put_device(call.tenant, user, token, call.body, now_ms=self.api.clock())
        return DeviceOut(
            token=token,
            platform=d.platform,
            added_ms=d.added_ms,
            invalid_since_ms=d.invalid_since_ms,
        )

    async def delete_device(self, call: Call) -> Deleted:
        user = call.id("user", MAX_USER_BYTES)
        token = call.path["token"]
        if not await self.reg.delete_device(call.tenant, user, token):
            raise UnknownDevice(f"user {user!r} has no device {token[:64]!r}", field="token")
        return Deleted(deleted=token)

    # --------------------------------------------------------------- subscriptions
    async def put_subscription(self, call: Call) -> SubscriptionOut:
        user, topic = call.id("user", MAX_USER_BYTES), call.id("topic", MAX_TOPIC_BYTES)
        row = await self.reg.subscribe(call.tenant, user, topic, call.body, now_ms=self.api.clock())
        return sub_out(topic, row)

    async def get_subscription(self, call: Call) -> SubscriptionOut:
        user, topic = call.id("user", MAX_USER_BYTES), call.id("topic", MAX_TOPIC_BYTES)
        row = self.reg.subscription(call.tenant, user, topic)
        if row is None:
            raise UnknownSubscription(f"user {user!r} is not subscribed to {topic!r}")
        return sub_out(topic, row)

    async def delete_subscription(self, call: Call) -> Deleted:
        user, topic = call.id("user", MAX_USER_BYTES), call.id("topic", MAX_TOPIC_BYTES)
        if not await self.reg.unsubscribe(call.tenant, user, topic):
            raise UnknownSubscription(f"user {user!r} is not subscribed to {topic!r}")
        return Deleted(deleted=topic)

    async def list_subscriptions(self, call: Call) -> SubscriptionsPage:
        user = call.id("user", MAX_USER_BYTES)
        limit = call.query.get("limit", 100)
        rows = self.reg.subscriptions(call.tenant, user, after=call.query.get("after"), limit=limit)
        more = len(rows) == limit
        return SubscriptionsPage(
            subscriptions=[sub_out(t, s) for t, s in rows],
            next_after=rows[-1][0] if more and rows else None,
        )

    async def list_subscribers(self, call: Call) -> SubscribersPage:
        topic = call.id("topic", MAX_TOPIC_BYTES)
        rows, next_after = self.reg.subscriber_rows(
            call.tenant, topic, after=call.query.get("after"), limit=call.query.get("limit", 100)
        )
        return SubscribersPage(
            topic=topic,
            count=self.reg.subscriber_count(call.tenant, topic),
            subscribers=[SubscriberOut(user=u, channels=ch, filter=f) for u, ch, f in rows],
            next_after=next_after,
        )

    # ----------------------------------------------------------------- preferences
    async def put_preferences(self, call: Call) -> PreferencesOut:
        user = call.id("user", MAX_USER_BYTES)
        stored = await self.reg.put_preferences(
            call.tenant, user, call.body, now_ms=self.api.clock()
        )
        return answer(stored, PreferencesOut)

    async def get_preferences(self, call: Call) -> PreferencesOut:
        _user, profile = self._profile(call)
        return answer(profile.preferences or StoredPreferences(), PreferencesOut)

    async def put_defaults(self, call: Call) -> PreferencesOut:
        stored = await self.reg.put_defaults(call.tenant, call.body, now_ms=self.api.clock())
        return answer(stored, PreferencesOut)

    async def get_defaults(self, call: Call) -> PreferencesOut:
        return answer(self.reg.defaults(call.tenant) or StoredPreferences(), PreferencesOut)

    async def list_mandatory(self, call: Call) -> MandatoryTopics:
        return MandatoryTopics(topics=self.reg.mandatory_topics(call.tenant))

    async def put_mandatory(self, call: Call) -> MandatoryOut:
        topic = call.id("topic", MAX_TOPIC_BYTES)
        await self.reg.set_mandatory(call.tenant, topic, True, now_ms=self.api.clock())
        row = self.reg.mandatory(call.tenant, topic)
        return MandatoryOut(topic=topic, mandatory=True, since_ms=row.since_ms if row else None)

    async def delete_mandatory(self, call: Call) -> MandatoryOut:
        topic = call.id("topic", MAX_TOPIC_BYTES)
        if not await self.reg.set_mandatory(call.tenant, topic, False, now_ms=self.api.clock()):
            raise UnknownMandatory(f"topic {topic!r} is not mandatory", field="topic")
        return MandatoryOut(topic=topic, mandatory=False, since_ms=None)

    # --------------------------------------------------------------------- consent
    def _consent(self, tenant: str, user: str, profile: Profile) -> ConsentOut:
        return ConsentOut(
            channels={ch: answer(st, ConsentStateOut) for ch, st in profile.consent.items()},
            ledger=[answer(e, ConsentEntryOut) for e in self.reg.consent_ledger(tenant, user)],
            contact_log=[answer(e, ContactEventOut) for e in self.reg.contact_log(tenant, user)],
        )

    async def get_consent(self, call: Call) -> ConsentOut:
        user, profile = self._profile(call)
        return self._consent(call.tenant, user, profile)

    async def post_consent(self, call: Call) -> ConsentOut:
        user = call.id("user", MAX_USER_BYTES)
        body: ConsentIn = call.body
        if body.legal and body.opted_in:
            raise InvalidRequest("legal: only an opt-out is legal", field="legal")
        entry = Consent(
            channel=body.channel,
            opted_in=body.opted_in,
            at_ms=self.api.clock(),
            source="api",
            legal=body.legal,
            scope=body.scope,
        )
        await self.reg.record_consent(call.tenant, user, entry)
        profile = self.reg.profile(call.tenant, user)
        assert profile is not None
        return self._consent(call.tenant, user, profile)

    # ------------------------------------------------------------------- workflows
    @staticmethod
    def _workflow_out(topic: str, row: Any) -> WorkflowOut:
        return WorkflowOut(
            topic=topic, version=row.version, updated_ms=row.updated_ms, workflow=row.body
        )

    async def put_workflow(self, call: Call) -> WorkflowOut:
        topic = call.id("topic", MAX_TOPIC_BYTES)
        row = await self.reg.put_workflow(call.tenant, topic, call.body, now_ms=self.api.clock())
        return self._workflow_out(topic, row)

    async def get_workflow(self, call: Call) -> WorkflowOut:
        topic = call.id("topic", MAX_TOPIC_BYTES)
        row = self.reg.workflow(call.tenant, topic)
        if row is None:
            raise UnknownWorkflow(f"topic {topic!r} has no workflow", field="topic")
        return self._workflow_out(topic, row)

    async def delete_workflow(self, call: Call) -> Deleted:
        topic = call.id("topic", MAX_TOPIC_BYTES)
        if not await self.reg.delete_workflow(call.tenant, topic):
            raise UnknownWorkflow(f"topic {topic!r} has no workflow", field="topic")
        return Deleted(deleted=topic)


def routes(api: Api) -> list[Route]:
    h = RegistryHandlers(api)
    r = api.route
    dev = {**USER, "token": "the device's push token"}
    sub = {**USER, **TOPIC}
    return [
        # users
        r("PUT", "/users/{user}", h.put_user, "Create or replace a user", "users",
          scopes=WRITE, body=User, answer=UserOut, path_params=USER,
          description="Contact data. A webhook without a secret keeps its secret, or gets a "
          "new one (shown in this answer)."),
        r("GET", "/users/{user}", h.get_user, "Get a user", "users", scopes=READ,
          answer=UserOut, path_params=USER, errors=(404,),
          description="The webhook secret is shown to admin keys only."),
        r("DELETE", "/users/{user}", h.delete_user, "Erase a user (GDPR)", "users",
          scopes=WRITE, answer=Erased, path_params=USER, errors=(404,),
          description="Erases the registry's rows and what the notifications engine holds "
          "on the user (feed, statuses, parked runs, batch windows, dead letters); the log's "
          "records expire with their retention (docs/API.md)."),
        r("POST", "/users/{user}/webhook/enable", h.enable_webhook,
          "Enable a disabled webhook endpoint", "users", scopes=WRITE, answer=UserOut,
          path_params=USER, errors=(404,),
          description="The webhook channel disables an endpoint that answered 410, failed for "
          "disable-after-ms or was refused (recorded in the contact log); this clears it."),
        r("GET", "/users/{user}/export", h.export_user, "Export everything held on a user",
          "users", scopes=READ, answer=ExportOut, path_params=USER, errors=(404,)),
        r("PUT", "/users/{user}/devices/{token}", h.put_device, "Register a push device",
          "users", scopes=WRITE, body=Device, answer=DeviceOut, path_params=dev),
        r("DELETE", "/users/{user}/devices/{token}", h.delete_device, "Forget a push device",
          "users", scopes=WRITE, answer=Deleted, path_params=dev, errors=(404,)),
        # subscriptions
        r("GET", "/users/{user}/subscriptions", h.list_subscriptions,
          "List a user's subscriptions", "subscriptions", scopes=READ,
          answer=SubscriptionsPage, path_params=USER, query=PAGE),
        r("PUT", "/users/{user}/subscriptions/{topic}", h.put_subscription,
          "Subscribe a user to a topic", "subscriptions", scopes=WRITE, body=Subscription,
          answer=SubscriptionOut, path_params=sub),
        r("GET", "/users/{user}/subscriptions/{topic}", h.get_subscription,
          "Get a subscription", "subscriptions", scopes=READ, answer=SubscriptionOut,
          path_params=sub, errors=(404,)),
        r("DELETE", "/users/{user}/subscriptions/{topic}", h.delete_subscription,
          "Unsubscribe a user from a topic", "subscriptions", scopes=WRITE, answer=Deleted,
          path_params=sub, errors=(404,)),
        r("GET", "/subscribers/{topic}", h.list_subscribers, "List a topic's subscribers",
          "subscriptions", scopes=READ, answer=SubscribersPage, path_params=TOPIC,
          query=PAGE, description="In user-id order, a page at a time."),
        # preferences and consent
        r("PUT", "/users/{user}/preferences", h.put_preferences, "Set a user's preferences",
          "preferences", scopes=WRITE, body=Preferences, answer=PreferencesOut,
          path_params=USER),
        r("GET", "/users/{user}/preferences", h.get_preferences, "Get a user's preferences",
          "preferences", scopes=READ, answer=PreferencesOut, path_params=USER,
          errors=(404,)),
        r("GET", "/users/{user}/consent", h.get_consent, "Get a user's consent", "preferences",
          scopes=READ, answer=ConsentOut, path_params=USER, errors=(404,)),
        r("POST", "/users/{user}/consent", h.post_consent, "Record an opt-in or opt-out",
          "preferences", scopes=WRITE, body=ConsentIn, answer=ConsentOut, path_params=USER,
          description="Appended to the user's consent ledger with source 'api'."),
        r("PUT", "/admin/defaults", h.put_defaults, "Set the tenant's default preferences",
          "preferences", scopes=WRITE, body=Preferences, answer=PreferencesOut),
        r("GET", "/admin/defaults", h.get_defaults, "Get the tenant's default preferences",
          "preferences", scopes=READ, answer=PreferencesOut),
        r("GET", "/admin/mandatory", h.list_mandatory, "List mandatory topics", "preferences",
          scopes=READ, answer=MandatoryTopics),
        r("PUT", "/admin/mandatory/{topic}", h.put_mandatory, "Make a topic mandatory",
          "preferences", scopes=WRITE, answer=MandatoryOut, path_params=TOPIC,
          description="Users cannot opt out of it (a legal opt-out still wins)."),
        r("DELETE", "/admin/mandatory/{topic}", h.delete_mandatory,
          "Make a topic optional again", "preferences", scopes=WRITE, answer=MandatoryOut,
          path_params=TOPIC, errors=(404,)),
        # workflows
        r("PUT", "/workflows/{topic}", h.put_workflow, "Create or replace a workflow",
          "workflows", scopes=WRITE, body=Workflow, answer=WorkflowOut, path_params=TOPIC),
        r("GET", "/workflows/{topic}", h.get_workflow, "Get a workflow", "workflows",
          scopes=READ, answer=WorkflowOut, path_params=TOPIC, errors=(404,)),
        r("DELETE", "/workflows/{topic}", h.delete_workflow, "Delete a workflow", "workflows",
          scopes=WRITE, answer=Deleted, path_params=TOPIC, errors=(404,),
          description="The topic's default applies again: each channel its subscribers "
          "chose."),
    ]  # fmt: skip
