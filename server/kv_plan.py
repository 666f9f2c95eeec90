"""The paged KV pool's size: one budget for the rows' KV and the resident prefixes (the
prefix cache's device tier), in bytes from the flags or from the GPU's free memory, then in
blocks. Called by `app.py` once the model is loaded."""

import dataclasses
import logging

import torch

from prefix_store.fingerprint import prefix_spec_for
from server.config import Settings
from server.engine.kv_cache import KVLayout
from server.engine.model_loader import LoadedModel

log = logging.getLogger(__name__)


def pool_bytes(kv_cache_bytes: int, gpu_memory_utilization: float | None, free_bytes: int | None) -> int:
    """The pool's bytes: `gpu_memory_utilization` of the device memory free once the weights are
    loaded (`free_bytes`, None where the device does not report it, as on a CPU) when both are
    given, else `kv_cache_bytes`."""
    if gpu_memory_utilization is None or free_bytes is None:
        return kv_cache_bytes
    return int(gpu_memory_utilization * free_bytes)


def free_device_bytes(device: torch.device) -> int | None:
    """Device memory free now (after the weights), or None off CUDA."""
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return int(free)


def pool_budget(settings: Settings, device: torch.device) -> tuple[int, str]:
    """(bytes, where they come from) for the pool on `device`; warns about flags without effect."""
    if settings.cache_bytes is not None:
        log.warning(
            "--cache-bytes is deprecated and has no effect: the device prefix tier is now the KV pool, "
            "sized by --kv-cache-bytes (or --gpu-memory-utilization on CUDA)"
        )
    fraction = settings.gpu_memory_utilization
    free = free_device_bytes(device) if fraction is not None else None
    if fraction is not None and free is None:
        log.info("--gpu-memory-utilization is ignored on %s: the pool is --kv-cache-bytes", device.type)
    num_bytes = pool_bytes(settings.kv_cache_bytes, fraction, free)
    if fraction is None or free is None:
        return num_bytes, "--kv-cache-bytes"
    return num_bytes, f"--gpu-memory-utilization {fraction} of {free >> 20} MiB free"


def plan_kv(settings: Settings, loaded: LoadedModel, num_bytes: int | None = None) -> KVLayout:
    """The paged pool: as many blocks as `num_bytes` (default `--kv-cache-bytes`) hold;
    `--max-batch-size` caps the rows. `max_model_len` only limits a request: it reserves nothing."""
    num_bytes = settings.kv_cache_bytes if num_bytes is None else num_bytes
    spec = prefix_spec_for(loaded.model.config, loaded.dtype, loaded.max_positions)
    max_len = min(loaded.max_positions, settings.max_model_len or loaded.max_positions)
    layout = KVLayout(
        spec.num_layers,
        spec.num_kv_heads,
        spec.head_dim,
        settings.max_batch_size,
        max_len,
        loaded.dtype,
        loaded.device,
        num_blocks=1,
    )
    num_blocks = num_bytes // layout.bytes_per_block
    needed = -(-max_len // layout.block_size) + 2  # one full-length row, its prefix's last block, block 0
    if num_blocks < needed:
        raise ValueError(
            f"a KV pool of {num_bytes} bytes cannot hold one row of {max_len} positions "
            f"({needed} blocks of {layout.bytes_per_block} bytes); raise --kv-cache-bytes "
            "(or --gpu-memory-utilization) or lower --max-model-len"
        )
    return dataclasses.replace(layout, num_blocks=num_blocks)


def log_pool(layout: KVLayout, origin: str) -> None:
    """The pool in blocks, in positions and in rows of `max_model_len`."""
    usable = (layout.total_blocks - 1) * layout.block_size
    log.info(
        "KV pool (%s): %d blocks of %d positions (%d MiB) = %d positions, %.1f rows of %d positions; "
        "at most %d rows at once; resident prefixes share these blocks",
        origin,
        layout.total_blocks - 1,
        layout.block_size,
        layout.total_blocks * layout.bytes_per_block >> 20,
        usable,
        usable / layout.max_len,
        layout.max_len,
        layout.num_slots,
    )
