"""Tests of prefix_store: format, PEFT conversion, fingerprint, Redis store, cache tiers."""
