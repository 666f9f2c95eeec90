"""Every Prometheus collector: the server's own metrics (`core`), Redis health (`redis_health`)
and the vLLM names an inference gateway reads (`vllm_names`), fed from engine and store stats."""

from server.metrics.core import Metrics, PerTask

__all__ = ["Metrics", "PerTask"]
