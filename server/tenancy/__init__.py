"""Tenants: API keys (signed records in Redis, SHA-256 of the secret), task-id scopes and
rate-limit token buckets shared by every replica."""
