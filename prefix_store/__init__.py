"""Prefixes: the canonical format and its validation, PEFT conversion, the model fingerprint,
the Redis store (single, Sentinel, Cluster), the host and device cache tiers, and the embedded
Redis. Never imports server."""
