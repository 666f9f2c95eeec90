"""A cold prefix load (slow Redis) never stalls the rows already decoding."""

from __future__ import annotations

import asyncio
from pathlib import Path

import torch

from prefix_store.fingerprint import prefix_spec_for
from prefix_store.prefix_cache import PrefixCache
from prefix_store.redis_store import RedisPrefixStore, connect
from server.engine.config import EngineConfig
from server.engine.engine import Engine
from server.engine.kv_cache import KVLayout, SlotKVCache
from server.engine.model_loader import ModelOptions, load_model
from server.engine.request import SamplingParams
from tests.redis_server import RedisProcess


class SlowStore(RedisPrefixStore):
    """The real store with injected latency on reads of one task."""

    def __init__(self, *args, slow_task: str, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.slow_task = slow_task
        self.release = asyncio.Event()

    async def get(self, task_id: str):  # type: ignore[no-untyped-def]
        found = await super().get(task_id)
        if task_id == self.slow_task:
            await self.release.wait()
        return found


def test_cold_load_in_flight_does_not_stall_running_rows(gpt2_dir: Path, tmp_path: Path) -> None:
    loaded = load_model(ModelOptions(str(gpt2_dir), "cpu", "float32", tmp_path))
    spec = prefix_spec_for(loaded.model.config, loaded.dtype, loaded.max_positions)
    layout = KVLayout(spec.num_layers, spec.num_kv_heads, spec.head_dim, 4, 256, loaded.dtype, loaded.device)

    async def main() -> tuple[int, bool, int, list[int]]:
        with RedisProcess() as redis_proc:
            client = connect(redis_proc.url)
            store = SlowStore(client, "fp-cold", slow_task="cold")
            cache = PrefixCache(store, spec, loaded.device, 1 << 20)
            for task_id in ("hot", "cold"):
                await cache.put(task_id, torch.randn(spec.shape(3)))
            engine = Engine(loaded, SlotKVCache(layout), EngineConfig(max_queue=8))
            engine.start(asyncio.get_running_loop())
            try:
                hot = engine.submit(
                    await cache.get("hot"), [5, 6], SamplingParams(max_new_tokens=200, ignore_eos=True)
                )
                cold = asyncio.ensure_future(cache.get("cold"))
                received_while_loading = 0
                stream = hot.__aiter__()
                async for _ in stream:
                    received_while_loading += 1
                    if received_while_loading == 100:
                        break
                is_cold_done_then = cold.done()
                store.release.set()
                cold_entry = await cold
                assert cold_entry is not None
                params = SamplingParams(max_new_tokens=5, ignore_eos=True)
                cold_out = [t async for o in engine.submit(cold_entry, [5], params) for t in o.token_ids]
                rest = len([o async for o in stream])
                return received_while_loading, is_cold_done_then, rest, cold_out
            finally:
                engine.stop()
                await client.aclose()

    received, was_cold_done, rest, cold_out = asyncio.run(main())
    assert received == 100 and not was_cold_done  # 100 hot tokens arrived while the cold load was held
    assert rest == 100 and len(cold_out) == 5
