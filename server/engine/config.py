"""The engine's settings, one frozen record built at the edge (server/app.py, from `Settings`)."""

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineConfig:
    """How much the engine queues, batches and waits.

    `max_queue`: requests that may wait for a row before new ones get `QueueFull` (`--max-queue`);
    `max_num_batched_tokens`: tokens one step feeds the model, decode rows and prompt chunks
    together (`--max-num-batched-tokens`; None: unbounded, every prompt whole in one step);
    `max_rows_per_tenant`: running rows one tenant may hold (None: a fair share when others wait);
    `request_timeout_s`: seconds a request may take, queueing included (None: no limit).
    """

    max_queue: int = 256
    max_num_batched_tokens: int | None = 512
    max_rows_per_tenant: int | None = None
    request_timeout_s: float | None = None
