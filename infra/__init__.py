"""Plumbing shared by the prefix store, tenancy and the cluster launcher: Redis connections
(plain, Sentinel, Cluster URLs), the embedded redis-server, and child-process helpers.

Imports no other package of this project, so every one of them may import it.
"""
