"""The broker benchmark's scenarios, one module each (``python -m bench.run --help``):
``produce``, ``consume``, ``latency``, ``http_events`` and ``limits``. Client workloads run in
child processes started with ``spawn`` (:mod:`bench.scenarios.worker`), each on uvloop, so
every measurement starts from a clean interpreter and its CPU time can be read apart."""
