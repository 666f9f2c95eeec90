"""Tests of server/tenancy: API keys, scopes, rate limits."""
