"""The HTTP service and the inference engine: `prefix-serve` (`cli.py`), `Settings` (`config.py`,
the only place that reads flags and environment), `create_app` (`app.py`, which wires the parts),
the routes (`api/`), the engine (`engine/`), tenants (`tenancy/`), Prometheus metrics
(`metrics.py`), and `prefix-cluster` (`cluster.py`: one Redis, N replicas, HAProxy on one box)."""
