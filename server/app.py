"""`create_app(settings)`: the one place that builds and connects the parts."""

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator, Coroutine
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

from fastapi import FastAPI

from infra.connection import connect
from infra.embedded_redis import EmbeddedRedis
from prefix_store.fingerprint import model_fingerprint, prefix_spec_for
from prefix_store.migrate import migrate_layout
from prefix_store.prefix_cache import PrefixCache
from prefix_store.redis_store import REDIS_ERRORS, RedisPrefixStore
from server.api import (
    routes_admin,
    routes_chat,
    routes_drain,
    routes_generate,
    routes_health,
    routes_keys,
    routes_openai,
)
from server.api.auth_gate import AuthGateMiddleware
from server.api.client_cap import ClientCapMiddleware
from server.api.deps import RequestLimits, Services
from server.api.errors import install_error_handlers
from server.api.json_body import start_json_helper, stop_json_helper
from server.api.lifecycle import Lifecycle
from server.api.middleware import BodyLimitMiddleware, RequestMetricsMiddleware
from server.api.replica import ReplicaHeaderMiddleware
from server.api.retry_safe import RetrySafeMiddleware
from server.api.stall import StreamStallMiddleware
from server.config import Settings
from server.engine.chat import use_chat_template
from server.engine.config import EngineConfig
from server.engine.engine import Engine
from server.engine.kv_cache import KVLayout, PagedKVCache
from server.engine.model_loader import LoadedModel, ModelOptions, load_model
from server.engine.stats import PoolPrefixTier
from server.kv_plan import log_pool, plan_kv, pool_budget
from server.logs import announce_admin_token, console
from server.metrics import Metrics
from server.tenancy.keys import KeyStore
from server.tenancy.rate_limit import RateLimiter

log = logging.getLogger(__name__)


def _background(stack: AsyncExitStack, coroutine: Coroutine[Any, Any, None]) -> None:
    """Run a forever-task for the app's lifetime; cancelled at shutdown."""
    task = asyncio.ensure_future(coroutine)

    async def cancel() -> None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    stack.push_async_callback(cancel)


async def _supervise(embedded: EmbeddedRedis, interval_s: float = 0.5) -> None:
    """Restart the embedded Redis if it dies (same port, same append-only file)."""
    while True:
        await asyncio.sleep(interval_s)
        if not embedded.is_running:
            log.warning("embedded Redis exited; restarting it")
            try:
                embedded.start()  # on the main thread, like the first start (see EmbeddedRedis)
            except Exception:
                log.exception("embedded Redis restart failed; retrying")


async def _start_redis(settings: Settings, stack: AsyncExitStack) -> str:
    if settings.redis_url:
        return settings.redis_url
    embedded = EmbeddedRedis(settings.data_dir)
    url = embedded.start()  # on this thread: the child is tied to it (dies with the server)
    stack.callback(embedded.stop)
    _background(stack, _supervise(embedded))
    # the URL carries the password: the log gets it without
    log.info("embedded Redis at %s (data under %s)", embedded.public_url(), settings.data_dir / "redis")
    return url


async def _probe_redis(store: RedisPrefixStore, interval_s: float) -> None:
    """Ping Redis every `interval_s`, so metrics show an outage and its recovery as they happen."""
    while True:
        await store.ping()
        await asyncio.sleep(interval_s)


async def _open_store(
    settings: Settings, client: Any, fingerprint: str, stack: AsyncExitStack
) -> RedisPrefixStore:
    """The prefix store, its keys migrated to the sharded layout first (see prefix_store/migrate.py).
    With Redis down at start the server starts anyway (resident tasks, auth failing closed) and
    migrates once Redis answers."""
    store = RedisPrefixStore(client, fingerprint, settings.redis_min_replicas, settings.redis_wait_ms)
    try:
        await _migrate(client, store)
    except REDIS_ERRORS as exc:
        log.warning("Redis is unreachable at start (%s): the key-layout check runs once it answers", exc)
        _background(stack, _migrate_when_reachable(client, store, settings.coherence_interval_s))
    return store


async def _migrate(client: Any, store: RedisPrefixStore) -> None:
    moved = await migrate_layout(client, store.layout)
    if moved:
        log.warning("moved %d prefixes to the sharded key layout", moved)
    indexed = await store.build_namespace_indexes()  # stores of the previous version have none
    if indexed:
        log.warning("indexed %d prefixes by tenant namespace", indexed)


async def _migrate_when_reachable(client: Any, store: RedisPrefixStore, interval_s: float) -> None:
    while True:
        await asyncio.sleep(interval_s)
        try:
            await _migrate(client, store)
            return
        except REDIS_ERRORS:
            continue


async def _keep_refreshed(keys: KeyStore, interval_s: float) -> None:
    """Read the key store until it has been read once (until then generation answers 503), then
    notice within `interval_s` that another replica created the first key (it never unsets)."""
    while not keys.is_enabled:
        await asyncio.sleep(interval_s)
        was_known = keys.is_known
        await keys.refresh()
        if keys.is_enabled:
            log.warning("API keys are configured now: /generate and /v1 require a key")
        elif keys.is_known and not was_known:
            _warn_development_mode()


def _warn_development_mode() -> None:
    message = (
        "DEVELOPMENT MODE: no API keys are configured, so /generate and /v1 are open to anyone "
        "who can reach this port; create one with POST /admin/keys to require keys"
    )
    log.warning(message)
    console(f"WARNING: {message}", also_logged=True)


async def _start_keys(client: Any, stack: AsyncExitStack, interval_s: float, admin_token: str) -> KeyStore:
    """The key store (records MAC-ed with a secret derived from the admin token, which every
    replica shares). Fails closed: while it cannot be read, generation answers 503."""
    keys = KeyStore(client, admin_token)
    await keys.refresh()
    if not keys.is_known:
        log.warning("the API-key store cannot be read yet: /generate and /v1 answer 503 until it can")
    elif not keys.is_enabled:
        _warn_development_mode()
    if not keys.is_enabled:
        _background(stack, _keep_refreshed(keys, interval_s))
    return keys


def _limits(settings: Settings) -> RequestLimits:
    return RequestLimits(
        settings.max_new_tokens,
        settings.max_prompt_tokens,
        settings.max_stop_strings,
        settings.max_upload_bytes,
        settings.max_body_bytes,
        settings.max_prompts,
        settings.max_prompt_chars,
    )


def _metrics(settings: Settings, loaded: LoadedModel, fingerprint: str, layout: KVLayout) -> Metrics:
    """The collectors, with `model_info` naming what this replica serves and its KV pool."""
    metrics = Metrics(
        settings.metrics_max_tasks,
        settings.metrics_per_task,
        settings.metrics_token,
        settings.metrics_vllm_names,
    )
    metrics.model_info.info(
        {
            "model": loaded.name,
            "device": str(loaded.device),
            "dtype": str(loaded.dtype).removeprefix("torch."),
            "fingerprint": fingerprint,
            "max_len": str(layout.max_len),
            "kv_slots": str(layout.num_slots),
            "kv_blocks": str(layout.total_blocks - 1),
            "kv_block_size": str(layout.block_size),
        }
    )
    return metrics


def _announce(
    settings: Settings, loaded: LoadedModel, fingerprint: str, layout: KVLayout, pool_origin: str
) -> None:
    log.info("model %s fingerprint %s, context %d positions", loaded.name, fingerprint, layout.max_len)
    log_pool(layout, pool_origin)
    console(
        f"model {loaded.name} on {loaded.device} ({loaded.dtype}), fingerprint {fingerprint}",
        also_logged=True,
    )
    console(f"listening on http://{settings.host}:{settings.port}")


async def _build(settings: Settings, stack: AsyncExitStack, lifecycle: Lifecycle) -> Services:
    settings.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    admin_token, is_new_token = settings.resolve_admin_token()
    redis_url = await _start_redis(settings, stack)
    client = connect(redis_url)
    stack.push_async_callback(client.aclose)
    options = ModelOptions(
        settings.model,
        settings.device,
        settings.dtype,
        settings.data_dir,
        settings.max_model_len,
        trust_remote_code=settings.trust_remote_code,
    )
    loaded = await asyncio.to_thread(load_model, options)
    use_chat_template(loaded.tokenizer, settings.chat_template)
    fingerprint = model_fingerprint(loaded.model, loaded.model.config)
    pool_bytes, pool_origin = pool_budget(settings, loaded.device)
    layout = plan_kv(settings, loaded, pool_bytes)
    spec = prefix_spec_for(loaded.model.config, loaded.dtype, layout.max_len)
    metrics = _metrics(settings, loaded, fingerprint, layout)
    config = EngineConfig(
        max_queue=settings.max_queue,
        max_num_batched_tokens=settings.max_num_batched_tokens,
        max_rows_per_tenant=settings.max_rows_per_tenant,
        request_timeout_s=settings.request_timeout,
    )
    engine = Engine(loaded, PagedKVCache(layout), config, on_step=metrics.observe_step)
    engine.start(asyncio.get_running_loop())
    await start_json_helper()
    stack.callback(stop_json_helper)
    stack.callback(engine.stop)
    lifecycle.end_all = lambda: asyncio.to_thread(engine.stop)
    store = await _open_store(settings, client, fingerprint, stack)
    _background(stack, _probe_redis(store, settings.coherence_interval_s))
    prefixes = PrefixCache(
        store,
        spec,
        loaded.device,
        settings.host_cache_bytes,
        on_load=metrics.prefix_load.observe,
        encoder=engine.encode_prefix,
        device_tier=PoolPrefixTier(engine.stats),
    )
    _background(stack, prefixes.keep_coherent(settings.coherence_interval_s))
    keys = await _start_keys(client, stack, settings.coherence_interval_s, admin_token)
    limiter = RateLimiter(client)
    metrics.bind(
        engine.stats, prefixes, lambda: keys.num_errors + limiter.num_errors, lambda: keys.is_enabled
    )
    _announce(settings, loaded, fingerprint, layout, pool_origin)
    is_given = bool(settings.admin_token) or settings.admin_token_file is not None
    announce_admin_token(admin_token, is_new_token, settings.data_dir / "admin_token", is_given)
    return Services(engine, prefixes, metrics, admin_token, _limits(settings), keys, limiter, lifecycle)


def create_app(settings: Settings) -> FastAPI:
    """The FastAPI app; the lifespan loads the model, starts Redis/engine, and stops them.

    `app.state.lifecycle.drain()` (called by the CLI on SIGTERM) refuses new generations and
    waits for running ones before the server exits.
    """
    lifecycle = Lifecycle(settings.drain_seconds)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            app.state.services = await _build(settings, stack, lifecycle)
            # start-up's objects (model, libraries) leave the collector's view: otherwise a body of
            # many small JSON arrays triggers full collections over them, 1 s on the event loop
            gc.freeze()
            yield

    # no redirect_slashes: its redirect to `/path` is absolute, built from the client's Host header
    # no docs UI unless asked: it loads its JavaScript from a CDN and maps the API for anyone
    app = FastAPI(
        title="prefix-server",
        lifespan=lifespan,
        redirect_slashes=False,
        docs_url="/docs" if settings.docs else None,
        redoc_url="/redoc" if settings.docs else None,
        openapi_url="/openapi.json" if settings.docs else None,
    )
    install_error_handlers(app)
    app.include_router(routes_generate.router)
    app.include_router(routes_admin.router)
    app.include_router(routes_health.router)
    app.include_router(routes_openai.router)
    app.include_router(routes_chat.router)
    app.include_router(routes_keys.router)
    app.include_router(routes_drain.router)
    app.state.lifecycle = lifecycle

    app.add_middleware(StreamStallMiddleware, stall_s=settings.stream_stall_timeout)  # innermost
    app.add_middleware(RetrySafeMiddleware)
    app.add_middleware(
        BodyLimitMiddleware,
        max_body_bytes=settings.max_body_bytes,
        max_upload_bytes=settings.max_upload_bytes,
    )
    app.add_middleware(AuthGateMiddleware, app_state=app.state, routes=app.router.routes)
    app.add_middleware(ClientCapMiddleware, max_per_client=settings.max_connections_per_client)
    app.add_middleware(RequestMetricsMiddleware, app_state=app.state)  # outermost: sees every answer
    app.add_middleware(ReplicaHeaderMiddleware, replica_id=settings.replica_id, port=settings.port)
    return app
