"""Tests of `infra/`: the Redis connection, the embedded Redis and the die-with-parent hook."""
