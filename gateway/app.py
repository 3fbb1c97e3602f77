"""Assembles the gateway: the proxy and admin listeners, the store, the snapshots kept in sync
with it, geo reloads, SIGHUP config reloads and the SIGTERM drain (docs/architecture.md §3)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import signal
import socket
import time
from typing import Any

from aiohttp import web

from gateway import metrics
from gateway.admin import build_admin_app, hide_server_version
from gateway.audit import record_audit, record_policy_applied
from gateway.errors import StoreError
from gateway.geo import GeoResolver, open_geo
from gateway.identity import KeyRegistry
from gateway.limits import Limits
from gateway.listeners import Listener
from gateway.log import logger
from gateway.pipeline import Pipeline, build_runtime
from gateway.policy import (
    PolicyDoc,
    canonical,
    compile_policy,
    load_policy_file,
    require_databases,
    validate_policy,
)
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
from gateway.store import StateFileError, Store, loaded_state, memory_state_file, open_store
from gateway.store.base import StoredPolicy
from gateway.tasks import cancel_and_wait, cancelling
from gateway.workers import worker_count

LAST_USED_FLUSH_S = 10.0


class GatewayService:
    """One gateway instance (one process); `start` then `wait_closed`, or `stop`."""

    def __init__(self, config: LoadedConfig, overrides: list[str] | None = None,
                 reuse_port: bool = False, environ: dict[str, str] | None = None) -> None:
        self.config = config
        self.environ = environ
        self.overrides = overrides or []
        self.reuse_port = reuse_port
        s = config.settings
        configure_logging(s.log.level, s.log.format)
        _log_warnings(config)
        self.geo: GeoResolver = open_geo(s.geo, config.path)
        try:
            self.store: Store = open_store(s.store.url, s.store.key_prefix, s.store.timeout_s)
        except StateFileError as exc:
            self.geo.close()
            raise ConfigError(config.path, "store.url", str(exc)) from None
        self.registry = KeyRegistry(self.store)
        self.limits = Limits(self.store, s.store.on_error,
                             s.store.fallback_instances * worker_count(environ), s.limits_headers,
                             observe_admission=metrics.store_duration.observe)
        self.pipeline = Pipeline(build_runtime(config), self.geo, self.registry, self.limits)
        self.synced = False
        self._tasks: list[asyncio.Task[None]] = []
        self._runners: list[web.AppRunner] = []
        self._stopping = asyncio.Event()
        self.proxy_port = 0
        self.admin_port = 0
        self._stop_task: asyncio.Future[None] | None = None
        self._policy_json = ""
        # Canonical JSON of the live policy and of `policy_file` as last read (None: no file,
        # or an invalid one): what `policy_file_differs` compares.
        self._live_json: str | None = None
        self._file_json: str | None = None
        self._cache_seen: dict[tuple[int, str], int] = {}
        self._sync_lock = asyncio.Lock()
        self._side_tasks: set[asyncio.Future[Any]] = set()
        # Requests in flight per upstream session; a session retired by a reload is closed when
        # its last request has ended (or at stop).
        self._upstream_inflight: dict[Upstream, int] = {}
        self._retired: set[Upstream] = set()
        # Proxy requests in flight (the tasks running them), for the shutdown deadline.
        self._requests: set[asyncio.Task[Any]] = set()
        self._requests_done = asyncio.Event()
        self._requests_done.set()
        self._listeners: list[Listener] = []
        self.draining = False

    # --- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        s = self.config.settings
        self._log_store_kind()
        await self._store_start()
        await self.store.subscribe(self._on_event)
        self.limits.start()
        self._tasks = [
            asyncio.create_task(self._sync_loop(), name="store-sync"),
            asyncio.create_task(self._geo_loop(), name="geo-reload"),
            asyncio.create_task(self._flush_loop(), name="last-used-flush"),
            asyncio.create_task(self._metrics_loop(), name="metrics-flush"),
        ]
        self._publish_gauges()
        hide_server_version()
        proxy = web.Application(client_max_size=s.upstream.max_body_bytes + 1)
        proxy.router.add_route("*", "/{tail:.*}", self._handle)
        admin = build_admin_app(self)
        try:
            self.proxy_port = await self._serve(proxy, s.listen, s.server.max_connections)
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
                     max_connections: int | None) -> int:
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
                            header_timeout_s=srv.header_timeout_s)
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
        """The proxy route: counts the request against the upstream session it will use and
        keeps its task for the shutdown deadline."""
        # Pipeline.handle reads `rt` before its first await, so this is the session it uses.
        upstream = self.pipeline.rt.upstream
        counts = self._upstream_inflight
        counts[upstream] = counts.get(upstream, 0) + 1
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
            left = counts[upstream] = counts[upstream] - 1
            if left == 0:
                del counts[upstream]
                if upstream in self._retired:
                    self._retired.discard(upstream)
                    self._spawn(upstream.close())

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
            await self._full_sync(seed=True)
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
        logger().info("shutdown_complete")
        self._stopping.set()

    async def _close_listeners(self) -> None:
        """Stop accepting, close every connection and the background loops."""
        for listener in self._listeners:
            listener.stop_accepting()
        for runner in self._runners:
            await runner.cleanup()
        self._runners.clear()
        self._listeners.clear()
        await cancel_and_wait([*self._tasks, *self._side_tasks], wait_s=0.5)

    async def _abort_start(self) -> None:
        """Undo a start that failed at its listeners: nothing was served yet."""
        await self._close_listeners()
        await self._close_parts()
        self.geo.close()

    async def _close_parts(self) -> None:
        for upstream in [*self._retired, *self._upstream_inflight]:
            await upstream.close()
        self._retired.clear()
        await self.pipeline.rt.upstream.close()
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
        An invalid config is refused and the running one stays."""
        try:
            new = await asyncio.to_thread(load_settings, self.config.path, self.overrides,
                                          self.environ)
        except ConfigError as exc:
            logger().error("config_reload_failed", path=self.config.path, reason=str(exc))
            return False
        s = new.settings
        # The policy file is read before anything changes: with `policy_source: file` an
        # invalid one refuses the whole reload and the live policy stays.
        file_doc: PolicyDoc | None = None
        file_error: str | None = None
        if s.policy_file:
            try:
                file_doc = await asyncio.to_thread(load_policy_file, s.policy_file)
            except ConfigError as exc:
                if s.policy_source == "file":
                    logger().error("config_reload_failed", path=new.path, reason=str(exc))
                    return False
                file_error = str(exc)
        old = self.config
        fixed = [f for f in ("listen", "admin_listen") if getattr(s, f) != getattr(
            old.settings, f)]
        if s.store != old.settings.store:
            fixed.append("store")
        policy = self.pipeline.policy
        try:
            if policy is not None:  # the live policy must keep every database it needs
                require_databases(policy.doc, s.geo, f"live policy v{policy.version}")
        except ConfigError as exc:
            logger().error("config_reload_failed", path=new.path, reason=str(exc))
            return False
        if s.geo.model_dump() != old.settings.geo.model_dump():
            try:
                geo = await asyncio.to_thread(open_geo, s.geo, new.path)
            except ConfigError as exc:
                logger().error("config_reload_failed", path=new.path, reason=str(exc))
                return False
            # Lookups are synchronous, so none is using the old readers once they are swapped.
            old_geo, self.geo = self.geo, geo
            self.pipeline.geo = geo
            old_geo.close()
        else:
            await self.geo.reload_in_thread()
        old_rt = self.pipeline.rt
        self.pipeline.rt = build_runtime(new)
        self.limits.family = s.limits_headers
        self.config = new
        # Requests in flight keep the old upstream session until the last of them ends (see
        # `_handle`); `stop` closes it if the service stops first.
        retired = old_rt.upstream
        if retired in self._upstream_inflight:
            self._retired.add(retired)
        else:
            self._spawn(retired.close())
        self._publish_gauges()
        # Logged under the old logging setup, so a stricter new level still shows the reload.
        logger().info("config_reloaded", path=new.path,
                      needs_restart=fixed or None)
        configure_logging(s.log.level, s.log.format)
        _log_warnings(new)
        await self._sync_policy_file(file_doc, file_error)
        return True

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._side_tasks.add(task)
        task.add_done_callback(self._side_tasks.discard)

    # --- store sync -----------------------------------------------------------------------
    @property
    def policy_version(self) -> int | None:
        p = self.pipeline.policy
        return p.version if p else None

    async def _full_sync(self, seed: bool = False) -> None:
        stored = await self.store.get_policy()
        s = self.config.settings
        file_doc: PolicyDoc | None = None
        file_error: str | None = None
        if seed and s.policy_file:
            if stored is None or s.policy_source == "file":
                file_doc = load_policy_file(s.policy_file)  # needed: an error stops the start
            else:
                try:
                    file_doc = load_policy_file(s.policy_file)
                except ConfigError as exc:
                    file_error = str(exc)
            self._file_json = canonical(file_doc) if file_doc is not None else None
            if stored is None or (s.policy_source == "file"
                                  and self._stored_json(stored) != self._file_json):
                assert file_doc is not None
                await self._apply_policy_file(file_doc, stored is None)
                stored = await self.store.get_policy()
        if stored is not None:
            self._install_policy(stored.version, stored.doc)
        await self.registry.load_all()
        self.synced = True
        if seed:
            self._report_policy_file(file_error)

    @staticmethod
    def _stored_json(stored: StoredPolicy) -> str:
        """A stored policy in today's canonical form (the stored text if it no longer
        validates), to compare with a file's."""
        try:
            return canonical(validate_policy(json.loads(stored.doc), "store"))
        except (ConfigError, ValueError):
            return stored.doc

    async def _apply_policy_file(self, doc: PolicyDoc, seeding: bool) -> None:
        """Write `policy_file`'s policy to the store as a new version, audited (`seed:<host>`
        into an empty store with `policy_source: store`, else `file:<host>`); when another
        instance wrote a version meanwhile, compare against that one and try again."""
        # A file that needs a database this config lacks is refused before it reaches the store
        # (ConfigError), so no instance is handed a policy it must reject.
        require_databases(doc, self.config.settings.geo, self.config.settings.policy_file or "")
        text = canonical(doc)
        source = self.config.settings.policy_source
        actor = ("seed:" if seeding and source == "store" else "file:") + socket.gethostname()
        for _ in range(3):
            before = await self.store.get_policy()
            if before is not None and (source == "store"
                                       or self._stored_json(before) == text):
                return  # seeded by another instance, or the file's policy is live already
            try:
                version = await self.store.put_policy(text, actor,
                                                      before.version if before else 0)
            except ValueError:
                continue  # another instance wrote a version first
            await record_policy_applied(self.store, actor, version,
                                        before.doc if before else None, text)
            self._install_policy(version, text)
            return

    async def _sync_policy_file(self, doc: PolicyDoc | None, error: str | None) -> None:
        """SIGHUP: with `policy_source: file` apply a changed file; either way report whether
        the file and the live policy differ."""
        s = self.config.settings
        self._file_json = canonical(doc) if doc is not None else None
        if doc is not None and s.policy_source == "file":
            try:
                stored = await self.store.get_policy()
                if stored is None or self._stored_json(stored) != self._file_json:
                    await self._apply_policy_file(doc, False)
            except StoreError as exc:
                error = f"not applied: store unavailable ({exc})"
                logger().error("config_reload_failed", path=s.policy_file, reason=error)
            except ConfigError as exc:
                error = f"not applied: {exc}"
                logger().error("config_reload_failed", path=s.policy_file, reason=error)
        self._report_policy_file(error)

    def _report_policy_file(self, error: str | None) -> None:
        """At start and on SIGHUP: warn `policy_file_differs` when `policy_file` (canonical
        JSON) is not the live policy; gateway_policy_file_differs follows it."""
        s = self.config.settings
        differs = s.policy_file is not None and (error is not None or (
            self._file_json is not None and self._live_json != self._file_json))
        metrics.POLICY_FILE_DIFFERS.set(1 if differs else 0)
        if differs:
            logger().warning(
                "policy_file_differs", file=s.policy_file, live_version=self.policy_version,
                policy_source=s.policy_source,
                reason=error or (
                    "the store's policy is live and differs from the file; `gateway policy "
                    "apply` the file to make it live" if s.policy_source == "store" else
                    "the file could not be applied (other instances kept writing versions)"))

    def _install_policy(self, version: int, doc_json: str) -> None:
        current = self.pipeline.policy
        if current is not None and current.version == version and doc_json == self._policy_json:
            return
        try:
            doc = validate_policy(json.loads(doc_json), f"store policy v{version}")
            # A rule on a database this gateway lacks would never fire: refuse the policy and
            # keep the one in force.
            require_databases(doc, self.config.settings.geo, f"store policy v{version}")
        except (ConfigError, ValueError) as exc:
            logger().error("policy_rejected", version=version, reason=str(exc))
            return
        self.pipeline.policy = compile_policy(doc, version)
        self._policy_json = doc_json
        self._live_json = canonical(doc)
        metrics.POLICY_VERSION.set(version)
        if self._file_json is not None:
            metrics.POLICY_FILE_DIFFERS.set(1 if self._live_json != self._file_json else 0)
        logger().info("policy_loaded", version=version, rules=len(doc.rules),
                      resellers=len(doc.resellers))

    async def _on_event(self, event: dict[str, Any]) -> None:
        try:
            kind = event.get("kind")
            if kind == "key" and isinstance(event.get("key_id"), str):
                await self.registry.refresh(event["key_id"])
                if event.get("epoch") == self.registry.epoch + 1:
                    self.registry.epoch += 1
            elif kind == "policy":
                stored = await self.store.get_policy()
                if stored is not None:
                    self._install_policy(stored.version, stored.doc)
            elif kind == "resync":
                await self._check_versions()
        except StoreError:
            self.limits.mark_store(False)

    async def _check_versions(self) -> None:
        # The sync loop and a subscriber reconnect may both ask; one check at a time, so a
        # store restoration is done once.
        async with self._sync_lock:
            await self._check_versions_locked()

    async def _check_versions_locked(self) -> None:
        keys_epoch, policy_version = await self.store.versions()
        if not self.synced:
            await self._full_sync(seed=True)
            return
        if keys_epoch < self.registry.epoch or (
                policy_version == 0 and self.pipeline.policy is not None):
            await self._restore_store(keys_epoch, policy_version)
            return
        if keys_epoch != self.registry.epoch:
            await self.registry.load_all()
        if policy_version and policy_version != self.policy_version:
            stored = await self.store.get_policy()
            if stored is not None:
                self._install_policy(stored.version, stored.doc)

    async def _restore_store(self, keys_epoch: int, policy_version: int) -> None:
        """The store came back with less than this instance knows (a Redis restarted without
        persistence, a failover to a stale replica): write the snapshots back rather than
        refuse every key. Revoked keys are written back revoked."""
        logger().error("store_data_lost", keys_epoch=keys_epoch,
                       known_keys_epoch=self.registry.epoch,
                       policy_version=policy_version, known_policy_version=self.policy_version)
        actor = "restore:" + socket.gethostname()
        policy = self.pipeline.policy
        if policy_version == 0 and policy is not None:
            try:
                await self.store.put_policy(canonical(policy.doc), actor, 0)
            except ValueError:
                pass  # another instance restored it first
        present = {r.key_id for r in await self.store.list_keys()}
        restored = 0
        for rec in list(self.registry.keys.values()):
            if rec.key_id not in present:
                await self.store.put_key(rec)
                restored += 1
        await record_audit(self.store, actor, "store_restored", "store", keys=restored,
                           policy_restored=policy_version == 0 and policy is not None)
        await self.registry.load_all()
        stored = await self.store.get_policy()
        if stored is not None:
            self._install_policy(stored.version, stored.doc)

    async def _sync_loop(self) -> None:
        """Safety net for lost events, and the store health signal for /readyz."""
        interval = self.config.settings.store.sync_interval_s
        while not cancelling():
            await asyncio.sleep(interval)
            try:
                await self._check_versions()
                self.limits.mark_store(True)
            except StoreError:
                self.limits.store_errors += 1
                self.limits.mark_store(False)
            except ConfigError as exc:
                logger().error("policy_rejected", reason=str(exc))
            metrics.STORE_UP.set(1 if self.limits.store_ok else 0)

    async def _geo_loop(self) -> None:
        while not cancelling():
            await asyncio.sleep(self.config.settings.geo.reload_interval_s)
            await self.geo.reload_in_thread()
            self._publish_gauges()  # ages grow even when no file changes

    async def _flush_loop(self) -> None:
        while not cancelling():
            await asyncio.sleep(LAST_USED_FLUSH_S)
            try:
                await self.registry.flush_last_used()
            except StoreError:
                pass

    async def _metrics_loop(self) -> None:
        while not cancelling():
            await asyncio.sleep(1.0)
            metrics.flush(self.pipeline.inflight, self.limits.store_errors)

    def _publish_gauges(self) -> None:
        for kind, st in self.geo.status(self.config.settings.geo.max_age_days).items():
            metrics.GEO_EPOCH.labels(kind).set(st["build_epoch"])
            metrics.GEO_AGE.labels(kind).set(st["age_days"])
            metrics.GEO_STALE.labels(kind).set(1 if st["stale"] else 0)
        metrics.STORE_UP.set(1 if self.limits.store_ok else 0)

    def publish_cache_counts(self) -> None:
        """Move the geo cache's hit/miss tallies (kept as plain ints on the hot path) into
        gateway_cache_lookups_total; called at scrape time."""
        for result, now in (("hit", self.geo.cache_hits), ("miss", self.geo.cache_misses)):
            seen = self._cache_seen.get((id(self.geo), result), 0)
            if now > seen:
                metrics.child(metrics.CACHE, "geo", result).inc(now - seen)
            self._cache_seen[(id(self.geo), result)] = now

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """(ready, body): not ready without geo or policy, or with the store away and
        `on_error: closed`; degraded (still ready) with the store away and `on_error: open`,
        or with a geo database older than `geo.max_age_days` or whose file has gone."""
        geo = self.geo.status(self.config.settings.geo.max_age_days)
        checks: dict[str, Any] = {
            "geo": geo,
            "policy": {"version": self.policy_version},
            "store": "ok" if self.limits.store_ok else "unreachable",
        }
        ready = self.policy_version is not None
        degraded = []
        if not self.limits.store_ok:
            if self.config.settings.store.on_error == "closed":
                ready = False
            else:
                degraded.append("store")
        if any(db["stale"] or db["missing"] for db in geo.values()):
            degraded.append("geo")
        status = "degraded" if degraded else "ready"
        if not ready:
            status = "not_ready"
        if self.draining:
            ready, status = False, "draining"
        return ready, {"status": status, "degraded": degraded if status == "degraded" else [],
                       "checks": checks, "time": time.time()}


def _log_warnings(config: LoadedConfig) -> None:
    for line in config.warnings:
        logger().warning("config_warning", path=config.path, warning=line)
