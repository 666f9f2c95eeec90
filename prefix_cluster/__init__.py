"""`prefix-cluster`: one Redis, N `prefix-serve` replicas and HAProxy in front of them, on one box.

`haproxy.cfg` here (package data, so an installed wheel and the image have it) is the one HAProxy
template: `haproxy.py` fills in the replicas' addresses (loopback for this launcher, a DNS
`server-template` for docker/haproxy/haproxy-dns.cfg and the Kubernetes ConfigMap);
`launcher.py` starts and stops the processes; `cli.py` is the command.
"""


class ClusterError(RuntimeError):
    """Something did not start; the message says what and where its log is."""
