"""The notifications core: workflows, subscriptions, preferences, fan-out, delivery, audit
(``docs/NOTIFY.md``). Built on the broker through its in-process front door."""
