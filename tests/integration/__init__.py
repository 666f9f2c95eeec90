"""Multi-process tests: real server processes over HTTP, real Redis (single, Sentinel, Cluster),
clusters behind HAProxy, the fresh clone, the README's and docs' shell blocks."""
