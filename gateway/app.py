"""Assembles the gateway and runs its lifecycle: the proxy and admin listeners, the store, the
background loops, SIGHUP config reloads and the SIGTERM drain (docs/architecture.md §3). The
snapshot sync is `gateway.sync`, readiness and gauges `gateway.status`."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import signal
import ssl
from typing import Any

from aiohttp import web

from gateway import metrics
from gateway.admin import build_admin_app, hide_server_version
from gateway.cancellation import cancel_and_wait
from gateway.errors import StoreError
from gateway.geo import GeoResolver, open_geo
from gateway.identity import KeyRegistry
from gateway.ledger import FLUSH_INTERVAL_S, Ledger
from gateway.limits import Limits
from gateway.listeners import Listener, ProxyProtocol
from gateway.log import logger
from gateway.loops import CleanupContext, Loops
from gateway.pipeline import Pipeline
from gateway.policy import PolicyDoc, load_policy_file, require_databases
from gateway.proxy import Upstream
from gateway.request_log import configure_logging
from gateway.settings import (
    ConfigError,
    LoadedConfig,
    StartupError,
    load_settings,
    parse_hostport,
    redact_url,
)
from gateway.snapshot import Snapshot, build_config_parts
from gateway.status import CacheTallies, publish_gauges, publish_store_up, readiness
from gateway.store import StateFileError, Store, loaded_state, memory_state_file, open_store
from gateway.sync import SnapshotSync
from gateway.tls import LoadedTLS, ServerTLS, load_tls
from gateway.workers import worker_count

LAST_USED_FLUSH_S = 10.0


@dataclasses.dataclass(frozen=True, slots=True)
class _Reload:
    """What a reload read, all valid: applied at once, or not at all."""

    config: LoadedConfig
    policy_file_doc: PolicyDoc | None
    policy_file_error: str | None  # the policy file refused (policy_source: store)
    tls: LoadedTLS | None  # certificates read again (TLS on before and after)
    geo: GeoResolver | None  # a new resolver, when the geo settings changed
    needs_restart: list[str]  # changed fields a reload cannot apply


class GatewayService:
    """One gateway instance (one process); `start` then `wait_closed`, or `stop`. Implements
    the admin API's `AdminBackend`."""

    def __init__(self, config: LoadedConfig, overrides: list[str] | None = None,
                 reuse_port: bool = False, environ: dict[str, str] | None = None) -> None:
        self.environ = environ
        self.overrides = overrides or []
        self.reuse_port = reuse_port
        s = config.settings
        configure_logging(s.log.level, s.log.format, s.log.hash_chain)
        _log_warnings(config)
        # TLS on the proxy listener: one context for the listener's life, whose certificate
        # is swapped on reload and when the files change (gateway/tls.py).
        self.tls = None if s.tls is None else ServerTLS.open(s.tls, config.path)
        geo = open_geo(s.geo, config.path)
        try:
            self.store: Store = open_store(s.store.url, s.store.key_prefix, s.store.timeout_s)
        except StateFileError as exc:
            geo.close()
            raise ConfigError(config.path, "store.url", str(exc)) from None
        self.registry = KeyRegistry(self.store)
        self.limits = Limits(self.store, s.store.on_error,
                             s.store.fallback_instances * worker_count(environ), s.limits_headers,
                             observe_admission=metrics.store_duration.observe)
        #: usage tallies, flushed to the store's ledger once a second (§12)
        self.ledger = Ledger(self.store, s.usage.retention_days)
        self.pipeline = Pipeline(Snapshot(build_config_parts(config), geo, self.registry),
                                 self.limits, self.ledger)
        self.sync = SnapshotSync(self.pipeline, self.store, self.limits)
        self.loops = Loops()
        self._cache_tallies = CacheTallies()
        self._runners: list[web.AppRunner] = []
        self._stopping = asyncio.Event()
        self.proxy_port = 0
        self.admin_port = 0
        self._stop_task: asyncio.Future[None] | None = None
        self._side_tasks: set[asyncio.Future[Any]] = set()
        # Requests in flight per snapshot they read; what a reload retired (the upstream
        # session, a replaced geo resolver) is closed once no request in flight uses it (or at
        # stop).
        self._inflight: dict[Snapshot, int] = {}
        self._retired: list[Upstream | GeoResolver] = []
        # Proxy requests in flight (the tasks running them), for the shutdown deadline.
        self._requests: set[asyncio.Task[Any]] = set()
        self._requests_done = asyncio.Event()
        self._requests_done.set()
        self._listeners: list[Listener] = []
        self.draining = False

    @property
    def config(self) -> LoadedConfig:
        """The config in force (that of the pipeline's snapshot)."""
        return self.pipeline.snapshot.parts.config

    @property
    def geo(self) -> GeoResolver:
        """The geo resolver in force."""
        return self.pipeline.snapshot.geo

    @property
    def policy_version(self) -> int | None:
        return self.sync.policy_version

    # --- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        s = self.config.settings
        self._log_store_kind()
        await self._store_start()
        await self.store.subscribe(self.sync.on_event)
        self.limits.start()
        self._publish_gauges()
        hide_server_version()
        proxy = web.Application(client_max_size=s.upstream.max_body_bytes + 1)
        proxy.router.add_route("*", "/{tail:.*}", self._handle)
        # The loops start with the proxy application and end when it is cleaned up (after
        # the drain), so keys and policy stay current while requests finish.
        proxy.cleanup_ctx.extend(self._background_loops())
        admin = build_admin_app(self)
        try:
            self.proxy_port = await self._serve(proxy, s.listen, s.server.max_connections,
                                                ProxyProtocol.of(s.client_ip),
                                                self.tls.context if self.tls else None)
            # The admin listener has its own socket and no cap: probes answer while the proxy
            # port is saturated.
            self.admin_port = await self._serve(admin, s.admin_listen, None)
        except StartupError:
            await self._abort_start()
            raise
        logger().info("gateway_started", listen=s.listen, admin_listen=s.admin_listen,
                      proxy_port=self.proxy_port, admin_port=self.admin_port,
                      upstream=redact_url(s.upstream.url), store=redact_url(s.store.url),
                      policy_version=self.policy_version)

    async def _serve(self, app: web.Application, hostport: str,
                     max_connections: int | None,
                     proxy_protocol: ProxyProtocol | None = None,
                     ssl_context: ssl.SSLContext | None = None) -> int:
        host, port = parse_hostport(hostport)
        srv = self.config.settings.server
        # keepalive_timeout is aiohttp's idle timeout; shutdown_timeout only bounds closing
        # connections left idle, as `stop` has already ended the requests. auto_decompress=False:
        # the pipeline inflates request bodies itself, within the body limit (aiohttp's own
        # inflation would let Content-Length bound only the compressed size).
        runner = web.AppRunner(app, handler_cancellation=True, access_log=None,
                               auto_decompress=False, keepalive_timeout=srv.idle_timeout_s,
                               shutdown_timeout=0.5)
        await runner.setup()
        assert runner.server is not None
        listener = Listener(runner.server, host, port, backlog=1024,
                            reuse_port=self.reuse_port, max_connections=max_connections,
                            header_timeout_s=srv.header_timeout_s,
                            proxy_protocol=proxy_protocol, ssl_context=ssl_context)
        self._runners.append(runner)
        try:
            bound = await listener.start()
        except OSError as exc:
            field = "listen" if hostport == self.config.settings.listen else "admin_listen"
            # One line, never a traceback: "address already in use", "permission denied",
            # "name or service not known" (an unresolvable host).
            reason = "address already in use" if exc.errno == errno.EADDRINUSE else (
                exc.strerror or str(exc)).lower()
            raise StartupError(f"{field} {hostport}: {reason}") from None
        self._listeners.append(listener)
        return bound

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        """The proxy route: counts the request against the config version it will use and
        keeps its task for the shutdown deadline."""
        # Pipeline.handle reads the snapshot before its first await, so this is the one it uses.
        snap = self.pipeline.snapshot
        counts = self._inflight
        counts[snap] = counts.get(snap, 0) + 1
        task = asyncio.current_task()
        assert task is not None
        self._requests.add(task)
        self._requests_done.clear()
        try:
            return await self.pipeline.handle(request)
        finally:
            self._requests.discard(task)
            if not self._requests:
                self._requests_done.set()
            left = counts[snap] = counts[snap] - 1
            if left == 0:
                del counts[snap]
                if self._retired:
                    self._close_unused()

    def _close_unused(self) -> None:
        """Close each retired upstream session or geo resolver no request in flight uses."""
        in_use = {id(x) for snap in self._inflight for x in (snap.parts.upstream, snap.geo)}
        unused = [x for x in self._retired if id(x) not in in_use]
        self._retired = [x for x in self._retired if id(x) in in_use]
        for part in unused:
            self._spawn(_close(part))

    def _log_store_kind(self) -> None:
        url = self.config.settings.store.url
        if not url.startswith("memory://"):
            return
        state_file = memory_state_file(url)
        if state_file is None:
            logger().warning("store_ephemeral", store=url, reason=(
                "the embedded store keeps keys, the policy and the audit trail in this process "
                "only: a restart loses them; persist them with "
                "store.url: memory:///var/lib/gateway/state.json, or use Redis"))
            return
        logger().info("store_state_loaded", state_file=state_file, **loaded_state(self.store))

    async def _store_start(self) -> None:
        try:
            await self.store.start()
            await self.sync.full_sync(seed=True)
        except StoreError as exc:
            # Serve anyway: /readyz says why; the sync loop keeps trying.
            logger().error("store_unavailable", reason=str(exc))
            self.limits.mark_store(False)

    async def stop(self) -> None:
        """SIGTERM: /readyz answers 503 at once; new connections are still accepted for
        `shutdown_drain_s` (load balancers deregister); then the proxy listener stops accepting
        and in-flight requests have until drain + grace in all; what is left is cut and logged
        with reason `shutdown`; then everything closes."""
        s = self.config.settings
        loop = asyncio.get_running_loop()
        deadline = loop.time() + s.shutdown_drain_s + s.shutdown_grace_s
        self.draining = True
        logger().info("shutdown_started", inflight=self.pipeline.inflight,
                      drain_s=s.shutdown_drain_s, grace_s=s.shutdown_grace_s)
        if s.shutdown_drain_s > 0:
            await asyncio.sleep(s.shutdown_drain_s)
        if self._listeners:  # the first is the proxy listener
            self._listeners[0].stop_accepting()
            server = self._runners[0].server
            if server is not None:
                # Idle keep-alive connections close now, busy ones after their response.
                server.pre_shutdown()
        remaining = deadline - loop.time()
        if self._requests and remaining > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self._requests_done.wait()
        if self._requests:
            self.pipeline.shutting_down = True
            logger().info("shutdown_cutting", inflight=len(self._requests))
            cut = list(self._requests)
            for task in cut:
                task.cancel()
            await asyncio.wait(cut, timeout=0.5)
        await self._close_listeners()
        try:
            # Within drain + grace + 1 s in all, whatever the store does.
            async with asyncio.timeout(max(0.2, deadline + 0.8 - loop.time())):
                await self._close_parts()
        except TimeoutError:
            logger().error("shutdown_incomplete", reason="closing the store timed out")
        self.geo.close()
        if self.pipeline.tracer is not None:  # export the spans still buffered, briefly
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2.0):
                    await asyncio.to_thread(self.pipeline.tracer.shutdown)
        logger().info("shutdown_complete")
        self._stopping.set()

    async def _close_listeners(self) -> None:
        """Stop accepting, close every connection and (the proxy application's cleanup
        contexts) the background loops."""
        for listener in self._listeners:
            listener.stop_accepting()
            listener.close_pending()
        for runner in self._runners:
            await runner.cleanup()
        self._runners.clear()
        self._listeners.clear()
        await cancel_and_wait(self._side_tasks, wait_s=0.5)

    async def _abort_start(self) -> None:
        """Undo a start that failed at its listeners: nothing was served yet."""
        await self._close_listeners()
        await self._close_parts()
        self.geo.close()

    async def _close_parts(self) -> None:
        retired, self._retired = self._retired, []
        for part in retired:
            await _close(part)
        await self.pipeline.snapshot.parts.upstream.close()
        # After the drain: what the requests of this instance used and was not yet flushed.
        await self.ledger.close()
        if self.ledger.pending():
            logger().error("usage_not_flushed", cells=len(self.ledger.pending()))
        try:
            await self.registry.flush_last_used()
        except StoreError:
            pass
        await self.limits.close()
        await self.store.close()

    def install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._on_term)
        loop.add_signal_handler(signal.SIGINT, self._on_term)
        loop.add_signal_handler(signal.SIGHUP, self._on_hup)

    def _on_hup(self) -> None:
        self._spawn(self.reload())

    def _on_term(self) -> None:
        if self._stop_task is None:
            self._stop_task = asyncio.ensure_future(self.stop())

    async def wait_closed(self) -> None:
        await self._stopping.wait()

    # --- reload ---------------------------------------------------------------------------
    async def reload(self) -> bool:
        """SIGHUP: re-read the config file, reopen changed geo databases, reconfigure logging.
        An invalid config is refused (one `config_reload_failed` line saying why) and the
        running one stays."""
        try:
            read = await self._read_reload()
        except ConfigError as exc:
            logger().error("config_reload_failed", path=self.config.path, reason=str(exc))
            return False
        new, s = read.config, read.config.settings
        # One swap, after the last await: a policy installed meanwhile is kept.
        snap = self.pipeline.snapshot
        self.pipeline.snapshot = dataclasses.replace(
            snap, parts=build_config_parts(new), geo=read.geo or snap.geo)
        self.limits.family = s.limits_headers
        if read.tls is not None and self.tls is not None:
            self.tls.install(read.tls, new.path)  # new handshakes; open connections keep theirs
        self.ledger.retention_days = s.usage.retention_days
        if self._listeners:  # the first is the proxy listener; new connections follow
            self._listeners[0].proxy_protocol = ProxyProtocol.of(s.client_ip)
        # Requests in flight keep the old upstream session (and a replaced geo resolver) until
        # the last of them ends (see `_handle`); `stop` closes them if the service stops first.
        self._retired.append(snap.parts.upstream)
        if read.geo is not None:
            self._retired.append(snap.geo)
        self._close_unused()
        self._publish_gauges()
        # Logged under the old logging setup, so a stricter new level still shows the reload.
        logger().info("config_reloaded", path=new.path,
                      needs_restart=read.needs_restart or None)
        configure_logging(s.log.level, s.log.format, s.log.hash_chain)
        _log_warnings(new)
        await self.sync.sync_policy_file(read.policy_file_doc, read.policy_file_error)
        return True

    async def _read_reload(self) -> _Reload:
        """Everything a reload reads before it changes anything: the config, the policy file,
        the certificates, the geo databases. ConfigError when any of them refuses the reload
        (the one exit `reload` logs)."""
        new = await asyncio.to_thread(load_settings, self.config.path, self.overrides,
                                      self.environ)
        s = new.settings
        # With `policy_source: file` an invalid policy file refuses the whole reload and the
        # live policy stays; otherwise it is only reported.
        file_doc: PolicyDoc | None = None
        file_error: str | None = None
        if s.policy_file:
            try:
                file_doc = await asyncio.to_thread(load_policy_file, s.policy_file)
            except ConfigError as exc:
                if s.policy_source == "file":
                    raise
                file_error = str(exc)
        old = self.config.settings
        fixed = [f for f in ("listen", "admin_listen") if getattr(s, f) != getattr(old, f)]
        if s.store != old.store:
            fixed.append("store")
        # The certificate files are read again (a bad pair refuses the reload and the one in
        # service stays); turning TLS on or off needs a restart.
        new_tls: LoadedTLS | None = None
        if (s.tls is None) != (old.tls is None):
            fixed.append("tls")
        elif s.tls is not None:
            new_tls = await asyncio.to_thread(load_tls, s.tls, new.path)
        policy = self.pipeline.snapshot.policy
        if policy is not None:  # the live policy must keep every database it needs
            require_databases(policy.doc, s.geo, f"live policy v{policy.version}")
        new_geo: GeoResolver | None = None
        if s.geo.model_dump() != old.geo.model_dump():
            new_geo = await asyncio.to_thread(open_geo, s.geo, new.path)
        else:
            await self.geo.reload_in_thread()
        return _Reload(new, file_doc, file_error, new_tls, new_geo, fixed)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._side_tasks.add(task)
        task.add_done_callback(self._side_tasks.discard)

    # --- background loops, readiness, metrics -------------------------------------------
    def _background_loops(self) -> list[CleanupContext]:
        """The loops that run while the proxy application runs (its cleanup contexts)."""
        sync_s = self.config.settings.store.sync_interval_s  # a store change needs a restart
        tls = self.tls
        watch = [] if tls is None else [self.loops.every(
            "tls-watch", lambda: tls.current.settings.reload_interval_s, tls.check)]
        return [
            self.loops.every("store-sync", lambda: sync_s, self.sync.sync_step),
            self.loops.every("geo-reload", lambda: self.config.settings.geo.reload_interval_s,
                             self._geo_step),
            self.loops.every("last-used-flush", lambda: LAST_USED_FLUSH_S, self._flush_step),
            self.loops.every("metrics-flush", lambda: 1.0, self._metrics_step),
            *watch,
            self.loops.every("usage-flush", lambda: FLUSH_INTERVAL_S, self.ledger.flush_step),
        ]

    async def _geo_step(self) -> None:
        await self.geo.reload_in_thread()
        self._publish_gauges()  # ages grow even when no file changes

    async def _flush_step(self) -> None:
        try:
            await self.registry.flush_last_used()
        except StoreError:
            pass

    async def _metrics_step(self) -> None:
        metrics.flush(self.pipeline.inflight, self.limits.store_errors)

    def _publish_gauges(self) -> None:
        publish_gauges(self.pipeline.snapshot, self.limits)

    def publish_metrics(self) -> None:
        """Before a scrape: the store gauge, the geo cache's tallies and the hot path's."""
        publish_store_up(self.limits)
        self._cache_tallies.publish(self.geo)
        metrics.flush(self.pipeline.inflight, self.limits.store_errors)

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """(ready, body) of /readyz (`gateway.status.readiness`)."""
        return readiness(self.pipeline.snapshot, self.limits, self.draining)


async def _close(part: Upstream | GeoResolver) -> None:
    """Close an upstream session or a geo resolver a reload retired."""
    if isinstance(part, Upstream):
        await part.close()
    else:
        part.close()


def _log_warnings(config: LoadedConfig) -> None:
    for line in config.warnings:
        logger().warning("config_warning", path=config.path, warning=line)
