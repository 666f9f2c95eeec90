"""Tests of trainer: `prefix-train` and `prefix-eval`."""
