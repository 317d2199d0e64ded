"""Servers the broker benchmark starts and stops: a Herald node and its peers, Redis (Streams,
AOF on) and NATS (JetStream, file storage). Each runs in its own temporary directory on the
repository's disk, bound to 127.0.0.1 on free ports, and is stopped when the run ends, also on
Ctrl-C or an exception (and, through ``PR_SET_PDEATHSIG``, if the runner itself is killed).
``bench/peers/setup`` installs the peer binaries with apt-get when they are missing."""
