"""The `gateway` command: run, check-config, keys, policy, audit, explain, geo, demo."""

from __future__ import annotations

import argparse
import asyncio
import difflib
import getpass
import json
import os
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from gateway.settings import ConfigError, LoadedConfig, StartupError, load_settings, redact_url

DEFAULT_CONFIG = os.environ.get("GATEWAY_CONFIG", "config/gateway.yaml")


def _load(args: argparse.Namespace) -> LoadedConfig:
    return load_settings(args.config, args.set)


def _print(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


# --- run / check-config -----------------------------------------------------------------------

def _preflight(config: LoadedConfig) -> None:
    """What `run` checks before it serves, and all that `check-config` checks: the geo
    databases open (and are no demo data unless allowed), the policy file is valid and names
    no database the config lacks. Raises one ConfigError with every problem found."""
    from gateway.geo import open_geo
    from gateway.policy import load_policy_file, require_databases

    s = config.settings
    errors = []
    try:
        open_geo(s.geo, config.path, 0).close()
    except ConfigError as exc:
        errors.append(exc)
    if s.policy_file:
        try:
            require_databases(load_policy_file(s.policy_file), s.geo, s.policy_file)
        except ConfigError as exc:
            errors.append(exc)
    if errors:
        raise ConfigError.of(errors)


def cmd_run(args: argparse.Namespace) -> int:
    from gateway.audit import configure_logging

    config = _load(args)
    configure_logging("error", "json")  # the databases' load lines come from the service
    _preflight(config)
    if args.workers > 1:
        from gateway.workers import supervise

        return supervise(args.config, args.set, args.workers)
    return _run_one(config, args.set, reuse_port=os.environ.get("GATEWAY_WORKER_ID") is not None)


def _run_one(config: LoadedConfig, overrides: list[str], reuse_port: bool) -> int:
    from gateway.allocator import return_large_blocks
    from gateway.app import GatewayService

    return_large_blocks()

    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is a dependency; keep running without it
        pass

    async def main() -> None:
        service = GatewayService(config, overrides, reuse_port=reuse_port)
        await service.start()
        service.install_signals()
        await service.wait_closed()

    asyncio.run(main())
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    from gateway.audit import configure_logging

    configure_logging("error", "json")
    config = _load(args)
    s = config.settings
    for line in config.warnings:
        print(f"warning: {line}", file=sys.stderr)
    _preflight(config)
    print(f"{config.path}: ok (listen {s.listen}, admin {s.admin_listen}, "
          f"upstream {redact_url(s.upstream.url)}, store {redact_url(s.store.url)})")
    return 0


# --- store access: Redis directly, the embedded store through the running gateway -------------

class Remote:
    """The admin API of a running gateway (for the embedded store)."""

    def __init__(self, config: LoadedConfig) -> None:
        host, _, port = config.settings.admin_listen.rpartition(":")
        host = "127.0.0.1" if host in ("0.0.0.0", "") else host.strip("[]")
        host = f"[{host}]" if ":" in host else host
        self.base = f"http://{host}:{port}"
        self.headers = {"Authorization": f"Bearer {config.secrets.admin_token}"}

    async def call(self, method: str, path: str, body: Any = None, text: str | None = None
                   ) -> Any:
        async with aiohttp.ClientSession(headers=self.headers) as s:
            try:
                async with s.request(method, self.base + path, json=body,
                                     data=text) as r:
                    doc = await r.json(content_type=None)
                    if r.status >= 400:
                        err = doc.get("error", {}) if isinstance(doc, dict) else {}
                        raise SystemExit(f"error: {err.get('message', doc)}")
                    return doc
            except aiohttp.ClientConnectorError:
                raise SystemExit(
                    f"error: cannot reach the gateway's admin API at {self.base} (the embedded "
                    "store lives in the running gateway: start it with `gateway run`)") from None


def _with_store(config: LoadedConfig, fn: Callable[[Any], Awaitable[Any]]) -> Any:
    from gateway.errors import StoreError
    from gateway.store import open_store

    async def go() -> Any:
        s = config.settings.store
        store = open_store(s.url, s.key_prefix, max(s.timeout_s, 3.0))
        try:
            await store.start()
            return await fn(store)
        except StoreError as exc:
            raise SystemExit(f"error: {exc}") from None
        finally:
            await store.close()

    return asyncio.run(go())


def _embedded(config: LoadedConfig) -> bool:
    return config.settings.store.url.startswith("memory://")


def _cli_logging() -> None:
    """Audit events of a CLI change go to stderr as JSON lines: stdout is the command's own
    output (with --json, exactly one JSON document)."""
    from gateway.audit import configure_logging, set_log_stream

    set_log_stream(sys.stderr)
    configure_logging("info", "json")


def _actor() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return "cli"


# --- keys -------------------------------------------------------------------------------------

def _expires(value: str | None) -> float | None:
    if value is None:
        return None
    v = value.strip()
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if v[-1:] in units and v[:-1].isdigit():
        return datetime.now(UTC).timestamp() + int(v[:-1]) * units[v[-1:]]
    try:
        dt = datetime.fromisoformat(v.replace("Z", "+00:00"))
    except ValueError:
        raise SystemExit(f"error: --expires {value!r}: use 30d, 12h or an ISO 8601 time") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


def cmd_keys(args: argparse.Namespace) -> int:
    from gateway import keys as ops
    from gateway.keys import KeyOpError

    config = _load(args)
    actor = _actor()
    remote = Remote(config) if _embedded(config) else None
    _cli_logging()

    def run(direct: Callable[[Any], Awaitable[Any]], method: str, path: str,
            body: Any = None) -> Any:
        if remote is not None:
            return asyncio.run(remote.call(method, path, body))

        async def wrapped(store: Any) -> Any:
            try:
                return await direct(store)
            except KeyOpError as exc:
                raise SystemExit(f"error: {exc}") from None

        return _with_store(config, wrapped)

    if args.keys_cmd == "issue":
        spec: dict[str, Any] = {"reseller": args.reseller}
        for f in ("name", "models", "paths", "countries", "rpm", "itpm", "otpm", "concurrency"):
            v = getattr(args, f)
            if v is not None:
                spec[f] = v
        exp = _expires(args.expires)
        if exp is not None:
            spec["expires_at"] = exp

        async def issue(store: Any) -> Any:
            rec, full = await ops.issue_key(store, spec, actor)
            return {"key_id": rec.key_id, "key": full, "record": rec.public()}

        out = run(issue, "POST", "/admin/keys", spec)
        if args.json:
            _print({"key_id": out["key_id"], "key": out["key"]})
        else:
            print(f"key_id: {out['key_id']}\nreseller: {args.reseller}\nkey: {out['key']}\n"
                  "(the key is shown this once; only its hash is stored)")
        return 0
    if args.keys_cmd == "list":
        path = "/admin/keys" + (f"?reseller={args.reseller}" if args.reseller else "")
        out = run(lambda st: ops.list_keys(st, args.reseller), "GET", path)
        rows = out["keys"] if isinstance(out, dict) else out
        if args.json:
            _print(rows)
        else:
            print(f"{'KEY_ID':<18}{'RESELLER':<14}{'STATUS':<9}{'NAME':<16}EXPIRES")
            for r in rows:
                exp_s = (datetime.fromtimestamp(r["expires_at"], UTC).isoformat(timespec="seconds")
                       if r.get("expires_at") else "-")
                print(f"{r['key_id']:<18}{r['reseller']:<14}{r['status']:<9}"
                      f"{(r.get('name') or '-'):<16}{exp_s}")
        return 0
    if args.keys_cmd == "show":
        _print(run(lambda st: ops.show_key(st, args.key_id), "GET", f"/admin/keys/{args.key_id}"))
        return 0
    if args.keys_cmd == "revoke":
        out = run(lambda st: ops.revoke_key(st, args.key_id, actor), "POST",
                  f"/admin/keys/{args.key_id}/revoke")
        _print(out) if args.json else print(f"revoked {args.key_id}")
        return 0
    if args.keys_cmd == "rotate":
        async def rotate(store: Any) -> Any:
            rec, full = await ops.rotate_key(store, args.key_id, actor, args.overlap)
            return {"key_id": rec.key_id, "key": full}

        out = run(rotate, "POST", f"/admin/keys/{args.key_id}/rotate",
                  {"overlap_s": args.overlap})
        if args.json:
            _print({"key_id": out["key_id"], "key": out["key"]})
        else:
            print(f"key_id: {out['key_id']}\nkey: {out['key']}\n(the old secret keeps working "
                  f"for {args.overlap:g} s)")
        return 0
    raise SystemExit("error: unknown keys command")


# --- policy -----------------------------------------------------------------------------------

def _yaml(doc: Any) -> str:
    return yaml.safe_dump(doc, sort_keys=False, default_flow_style=None, width=100)


def cmd_policy(args: argparse.Namespace) -> int:
    from gateway.policy import canonical, load_policy_file

    if args.policy_cmd == "validate":  # a file check: needs no config, secrets or store
        load_policy_file(args.file)
        print(f"{args.file}: ok")
        return 0
    config = _load(args)
    remote = Remote(config) if _embedded(config) else None

    def live() -> tuple[int, Any] | None:
        if remote is not None:
            async def get() -> Any:
                async with aiohttp.ClientSession(headers=remote.headers) as s:
                    async with s.get(remote.base + "/admin/policy") as r:
                        if r.status == 404:
                            return None
                        if r.status >= 400:
                            raise SystemExit(f"error: admin API answered {r.status}")
                        return await r.json()
            try:
                doc = asyncio.run(get())
            except aiohttp.ClientConnectorError:
                raise SystemExit(f"error: cannot reach the gateway's admin API at "
                                 f"{remote.base}") from None
            return None if doc is None else (doc["version"], doc["policy"])

        async def get_direct(store: Any) -> Any:
            stored = await store.get_policy()
            return None if stored is None else (stored.version, json.loads(stored.doc))

        result: tuple[int, Any] | None = _with_store(config, get_direct)
        return result

    if args.policy_cmd == "show":
        cur = live()
        if cur is None:
            raise SystemExit("error: no policy stored yet")
        if args.json:
            _print({"version": cur[0], "policy": cur[1]})
        else:
            print(f"# live policy version {cur[0]}\n" + _yaml(cur[1]), end="")
        return 0
    # apply
    from gateway.policy import require_databases

    doc = load_policy_file(args.file)
    require_databases(doc, config.settings.geo, args.file)
    new = json.loads(canonical(doc))
    cur = live()
    old_text = _yaml(cur[1]) if cur else ""
    diff = list(difflib.unified_diff(old_text.splitlines(), _yaml(new).splitlines(),
                                     f"live (v{cur[0]})" if cur else "live (none)",
                                     args.file, lineterm=""))
    print("\n".join(diff) if diff else "no changes against the live policy")
    if args.dry_run or not diff:
        if args.dry_run:
            print("(dry run: nothing applied)")
        return 0
    expected = cur[0] if cur else 0
    if remote is not None:
        out = asyncio.run(remote.call("PUT", f"/admin/policy?expected_version={expected}",
                                      text=canonical(doc)))
        version = out["version"]
    else:
        from gateway.audit import record_policy_applied

        _cli_logging()

        async def put(store: Any) -> int:
            before = await store.get_policy()
            try:
                v: int = await store.put_policy(canonical(doc), _actor(), expected)
            except ValueError as exc:
                raise SystemExit(f"error: {exc}; re-run to diff against it") from None
            await record_policy_applied(store, _actor(), v, before.doc if before else None,
                                        canonical(doc))
            return v

        version = _with_store(config, put)
    print(f"applied policy version {version}")
    return 0


# --- audit ------------------------------------------------------------------------------------

def cmd_audit(args: argparse.Namespace) -> int:
    from urllib.parse import urlencode

    from gateway.audit import parse_limit, parse_since

    config = _load(args)
    try:
        since = parse_since(args.since) if args.since else None
        limit = parse_limit(str(args.limit))
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    if _embedded(config):  # the embedded store's stream lives in the running gateway
        q = urlencode({"limit": limit, **({"since": repr(since)} if since is not None else {})})
        events = asyncio.run(Remote(config).call("GET", f"/admin/audit?{q}"))["events"]
    else:
        from gateway.audit import configure_logging, set_log_stream

        set_log_stream(sys.stderr)  # stdout is the listing alone
        configure_logging("error", "json")
        events = _with_store(config, lambda store: store.list_audit(since, limit))
    if args.json:
        _print({"events": events})
        return 0
    print(f"{'TIME':<22}{'ACTOR':<26}{'ACTION':<25}{'TARGET':<18}DETAILS")
    for e in events:
        when = datetime.fromtimestamp(e["time"], UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        extra = " ".join(f"{k}={v}" for k, v in e.items()
                         if k not in ("time", "actor", "action", "target"))
        print(f"{when:<22}{e['actor']:<26}{e['action']:<25}{e['target']:<18}{extra}".rstrip())
    return 0


# --- explain ----------------------------------------------------------------------------------

def cmd_explain(args: argparse.Namespace) -> int:
    config = _load(args)
    key = args.key or os.environ.get("GATEWAY_EXPLAIN_KEY")
    params = {"ip": args.ip, "reseller": args.reseller, "customer_ip": args.customer_ip,
              "customer_id": args.customer_id, "model": args.model, "path": args.path}
    if _embedded(config):
        remote = Remote(config)
        from urllib.parse import urlencode

        q = urlencode({k: v for k, v in params.items() if v})
        if key:
            remote.headers["x-explain-key"] = key
        out = asyncio.run(remote.call("GET", f"/admin/explain?{q}"))
    else:
        out = _explain_local(config, key, params)
    if args.json:
        _print(out)
    else:
        _print_trace(out)
    return 0 if out["decision"]["decision"] == "allow" else 1


def _explain_local(config: LoadedConfig, key: str | None, params: dict[str, Any]) -> Any:
    from gateway.audit import configure_logging
    from gateway.explain import explain
    from gateway.geo import open_geo
    from gateway.identity import KeyRegistry
    from gateway.limits import Limits
    from gateway.pipeline import Pipeline, build_runtime
    from gateway.policy import compile_policy, validate_policy

    configure_logging("error", "json")
    s = config.settings

    async def go(store: Any) -> Any:
        geo = open_geo(s.geo, config.path, 0)
        registry = KeyRegistry(store)
        await registry.load_all()
        rt = build_runtime(config)
        try:
            pipe = Pipeline(rt, geo, registry, Limits(store, "closed", 1, s.limits_headers))
            stored = await store.get_policy()
            if stored is not None:
                pipe.policy = compile_policy(validate_policy(json.loads(stored.doc), "store"),
                                             stored.version)
            return explain(pipe, registry, params["ip"], key=key, reseller=params["reseller"],
                           customer_ip=params["customer_ip"], customer_id=params["customer_id"],
                           model=params["model"], path=params["path"] or "/v1/messages")
        finally:
            await rt.upstream.close()
            geo.close()

    return _with_store(config, go)


def _print_trace(out: dict[str, Any]) -> None:
    def loc(d: dict[str, Any]) -> str:
        return (f"{d['ip']}: country {d['country'] or 'unknown'}, ASN {d['asn'] or 'unknown'}, "
                f"anonymizer {', '.join(d['anonymizer']) or 'none'}")

    print(f"policy version: {out.get('policy_version')}")
    print(f"client   {loc(out['client'])}")
    if out.get("customer"):
        print(f"customer {loc(out['customer'])}")
    ident = out.get("identity") or {}
    if ident:
        print(f"identity key {ident.get('key_id')} reseller {ident.get('reseller')} "
              f"{ident.get('error', '')}")
    for step in out.get("rules") or []:
        mark = "MATCH" if step["matched"] else "no   "
        why = f"on {step['matched_on']}" if step["matched"] else f"({step['failed_field']})"
        print(f"  rule {step['rule']:<24} {step['action']:<5} {step['mode']:<7} {mark} {why}")
    if out.get("shadow"):
        print(f"shadow (would deny): {', '.join(out['shadow'])}")
    for lim in out.get("limits") or []:
        print(f"  limit {lim['subject']}: rpm {lim['rpm']} itpm {lim['itpm']} "
              f"otpm {lim['otpm']} concurrency {lim['concurrency']}")
    d = out["decision"]
    print(f"decision: {d['decision'].upper()} {d['status']} {d['code'] or ''} at {d['stage']}"
          f"{': ' + d['message'] if d['message'] else ''}")


# --- geo --------------------------------------------------------------------------------------

def cmd_geo(args: argparse.Namespace) -> int:
    if args.geo_cmd == "build":
        try:
            from gateway.geo_build import build_all
        except ModuleNotFoundError as exc:
            return _missing_extra("geo build", exc)

        for p in build_all(Path(args.src), Path(args.out)):
            print(f"wrote {p}")
        return 0
    from gateway.audit import configure_logging
    from gateway.geo import open_geo

    configure_logging("error", "json")
    config = _load(args)
    s = config.settings
    geo = open_geo(s.geo, config.path, 0)
    try:
        info = geo.lookup(args.ip)
        raw = geo.explain(args.ip)
    finally:
        geo.close()
    out = {"ip": args.ip, "country": info.country, "registered_country": info.registered_country,
           "asn": info.asn, "asn_org": info.asn_org, "anonymizer": list(info.anonymizer),
           "databases": {k: {"path": v["path"], "database_type": v["database_type"],
                             "build_epoch": v["build_epoch"], "found": v["record"] is not None,
                             "prefix_len": v["prefix_len"]} for k, v in raw.items()}}
    if args.json:
        _print(out)
    else:
        print(f"{args.ip}")
        print(f"  country      {info.country or 'unknown'} (registered "
              f"{info.registered_country or 'unknown'})")
        print(f"  asn          {info.asn or 'unknown'} {info.asn_org or ''}")
        print(f"  anonymizer   {', '.join(info.anonymizer) or 'none'}")
        for k, v in out["databases"].items():
            print(f"  {k:<12} {'found' if v['found'] else 'not found'} in {v['path']} "
                  f"({v['database_type']}, build {v['build_epoch']})")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    try:
        from gateway.demo import run_demo
    except ModuleNotFoundError as exc:
        return _missing_extra("demo", exc)

    return run_demo()


#: Modules of the optional extras (pyproject.toml): the commands that need them name the extra.
_EXTRA_OF = {"anthropic": "demo", "openai": "demo", "mmdb_writer": "geo-build",
             "netaddr": "geo-build"}


def _missing_extra(command: str, exc: ModuleNotFoundError) -> int:
    """One line naming the extra to install (exit 2), for a module of an optional extra."""
    module = (exc.name or "").partition(".")[0]
    extra = _EXTRA_OF.get(module)
    if extra is None:
        raise exc
    print(f"error: gateway {command} needs the optional {extra!r} extra ({module} is not "
          f"installed): pip install '.[{extra}]' in a source checkout, or build the container "
          "image with --build-arg DEMO=1", file=sys.stderr)
    return 2


# --- parser -----------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gateway", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    def with_config(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sp.add_argument("--config", default=DEFAULT_CONFIG, help="config file (YAML)")
        sp.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a config field, e.g. --set upstream.url=http://...")
        return sp

    r = with_config(sub.add_parser("run", help="serve"))
    r.add_argument("--workers", type=int, default=1, help="processes sharing the listener")
    r.set_defaults(fn=cmd_run)
    with_config(sub.add_parser("check-config", help="validate a config file")).set_defaults(
        fn=cmd_check_config)

    k = sub.add_parser("keys", help="reseller keys")
    ks = k.add_subparsers(dest="keys_cmd", required=True)
    ki = with_config(ks.add_parser("issue"))
    ki.add_argument("--reseller", required=True)
    ki.add_argument("--name")
    ki.add_argument("--models", help="comma-separated globs, e.g. 'claude-*'")
    ki.add_argument("--paths", help="comma-separated path globs, e.g. '/v1/messages/**' "
                    "('*' stays within one segment, '**' spans segments)")
    ki.add_argument("--countries", help="comma-separated ISO codes")
    for f in ("rpm", "itpm", "otpm", "concurrency"):
        ki.add_argument(f"--{f}", type=int)
    ki.add_argument("--expires", help="30d, 12h, or an ISO 8601 time")
    ki.add_argument("--json", action="store_true")
    kl = with_config(ks.add_parser("list"))
    kl.add_argument("--reseller")
    kl.add_argument("--json", action="store_true")
    for name in ("show", "revoke", "rotate"):
        kx = with_config(ks.add_parser(name))
        kx.add_argument("key_id")
        kx.add_argument("--json", action="store_true")
        if name == "rotate":
            kx.add_argument("--overlap", type=float, default=3600.0,
                            help="seconds the old secret keeps working (default 3600)")
    k.set_defaults(fn=cmd_keys)

    pol = sub.add_parser("policy", help="the policy document")
    ps = pol.add_subparsers(dest="policy_cmd", required=True)
    pa = with_config(ps.add_parser("apply"))
    pa.add_argument("file")
    pa.add_argument("--dry-run", action="store_true")
    pv = with_config(ps.add_parser("validate"))
    pv.add_argument("file")
    psh = with_config(ps.add_parser("show"))
    psh.add_argument("--json", action="store_true")
    pol.set_defaults(fn=cmd_policy)

    au = sub.add_parser("audit", help="the audit trail of administrative changes")
    aus = au.add_subparsers(dest="audit_cmd", required=True)
    al = with_config(aus.add_parser("list", help="administrative changes, oldest first"))
    al.add_argument("--since", help="24h, 30m, 7d, an ISO 8601 time or Unix seconds "
                                    "(default: all the store keeps)")
    al.add_argument("--limit", type=int, default=1000,
                    help="the newest N events (default 1000, at most 10000)")
    al.add_argument("--json", action="store_true", help='one JSON document {"events": [...]}')
    au.set_defaults(fn=cmd_audit)

    e = with_config(sub.add_parser("explain", help="trace the decision for a request"))
    e.add_argument("--ip", required=True)
    e.add_argument("--key", help="a full key (or set GATEWAY_EXPLAIN_KEY)")
    e.add_argument("--reseller")
    e.add_argument("--customer-ip")
    e.add_argument("--customer-id")
    e.add_argument("--model")
    e.add_argument("--path", default="/v1/messages")
    e.add_argument("--json", action="store_true")
    e.set_defaults(fn=cmd_explain)

    g = sub.add_parser("geo", help="geo databases")
    gs = g.add_subparsers(dest="geo_cmd", required=True)
    gb = gs.add_parser("build", help="build the demo databases from their JSON sources")
    gb.add_argument("--src", default="geo/demo/src")
    gb.add_argument("--out", default="geo/demo")
    gl = with_config(gs.add_parser("lookup", help="what the gateway knows about an address"))
    gl.add_argument("ip")
    gl.add_argument("--json", action="store_true")
    g.set_defaults(fn=cmd_geo)

    sub.add_parser("demo", help="run the end-to-end demo").set_defaults(fn=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.fn(args)
    except ConfigError as exc:
        for problem in exc.problems:  # every problem of the file, one line each
            print(f"error: {problem.line()}", file=sys.stderr)
        return 2
    except StartupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return code
