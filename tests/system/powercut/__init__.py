"""A power-loss simulation for system tests: a FUSE filesystem that forgets, on command,
everything not yet made durable by fsync (see docs/TESTING.md)."""
