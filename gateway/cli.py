"""The `gateway` command: run, check-config, keys, policy, audit, explain, usage, geo, report.

Exit codes: 0 success; 1 failure (store or gateway unreachable, unknown key, a request explain
would refuse) or a difference found (policy apply --dry-run); 2 usage or config error
(a bad option, an invalid config file or field value, a missing secret the command needs)."""

from __future__ import annotations

import argparse
import asyncio
import csv
import difflib
import getpass
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, NoReturn, TypeVar

import yaml

from gateway import __version__
from gateway.errors import OperationError
from gateway.key_admin import LIMIT_FIELDS, quota_name
from gateway.operations import (
    AdminOperations,
    ExplainQuery,
    Operations,
    direct_operations,
)
from gateway.settings import (
    ConfigError,
    LoadedConfig,
    StartupError,
    load_settings,
    parse_hostport,
    redact_url,
)

DEFAULT_CONFIG = os.environ.get("GATEWAY_CONFIG", "config/gateway.yaml")
EXIT_FAILURE = 1  # a failure, or a difference found
EXIT_USAGE = 2  # usage or config error
T = TypeVar("T")


class CliError(Exception):
    """A command that cannot complete: printed as one `error:` line, exit `code`."""

    def __init__(self, message: str, code: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.code = code


def _fail(message: str, code: int = EXIT_FAILURE) -> NoReturn:
    raise CliError(message, code)


def _load(args: argparse.Namespace) -> LoadedConfig:
    """The config as `run` needs it: both secrets must be set."""
    return load_settings(args.config, args.set)


def _load_admin(args: argparse.Namespace) -> LoadedConfig:
    """The config for an administrative command: no secret is required up front (only `run`
    needs the upstream credential); the admin API client asks for the admin token itself."""
    return load_settings(args.config, args.set, require_secrets=False)


def _iso(ts: Any) -> str:
    from gateway.key_admin import iso_time

    return (iso_time(ts) or "-") if isinstance(ts, int | float) else "-"


def _print(obj: Any, sort_keys: bool = True) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=sort_keys, default=str) + "\n")


# --- run / check-config -----------------------------------------------------------------------

def _preflight(config: LoadedConfig) -> None:
    """What `run` checks before it serves, and all that `check-config` checks: the geo
    databases open (and are no demo data unless allowed), the policy file is valid and names
    no database the config lacks, the TLS files make a certificate and key that match. Raises
    one ConfigError with every problem found."""
    from gateway.geo import open_geo
    from gateway.policy import load_policy_file, require_databases
    from gateway.tls import load_tls

    s = config.settings
    errors = []
    try:
        open_geo(s.geo, config.path, 0).close()
    except ConfigError as exc:
        errors.append(exc)
    if s.tls is not None:
        try:
            load_tls(s.tls, config.path)
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
    from gateway.request_log import configure_logging

    config = _load(args)
    # the databases' load lines come from the service; any line printed is chained already
    configure_logging("error", "json", config.settings.log.hash_chain)
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


def _stderr_line(text: str) -> None:
    """One line on stderr in ONE write (print writes the newline apart): the processes of
    `--workers N` share stderr, and two refusing at once must not run their lines together."""
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def cmd_check_config(args: argparse.Namespace) -> int:
    from gateway.request_log import configure_logging

    configure_logging("error", "json")
    config = _load(args)
    s = config.settings
    for line in config.warnings:
        _stderr_line(f"warning: {line}")
    _preflight(config)
    print(f"{config.path}: ok (listen {s.listen}, admin {s.admin_listen}, "
          f"upstream {redact_url(s.upstream.url)}, store {redact_url(s.store.url)})")
    return 0


# --- store operations: the store itself, or the running gateway for the embedded store --------

#: Where a client on this machine calls a listener bound on a wildcard address: the
#: loopback address of the same family.
LOOPBACK_OF_WILDCARD = {"0.0.0.0": "127.0.0.1", "::": "::1"}


def admin_operations(config: LoadedConfig) -> AdminOperations:
    """The admin API of the running gateway (which owns the embedded store): its
    `admin_listen` address (a wildcard one called on loopback) and the admin token."""
    if not config.secrets.admin_token:
        var = config.settings.admin_token_env
        raise ConfigError(config.path, "admin_token_env",
                          f"environment variable {var} is not set: with the embedded store "
                          "this command talks to the running gateway's admin API, which "
                          "needs the admin token")
    host, port = parse_hostport(config.settings.admin_listen)
    host = LOOPBACK_OF_WILDCARD.get(host, host)
    host = f"[{host}]" if ":" in host else host
    return AdminOperations(f"http://{host}:{port}", config.secrets.admin_token)


def _operator(config: LoadedConfig) -> Callable[[Callable[[Operations], Awaitable[T]]], T]:
    """Pick the operations of a command once: through the admin API for the embedded store
    (the gateway process owns it), on the store directly otherwise. The function returned
    runs one operation to completion; an OperationError reaches `main`."""
    remote = admin_operations(config) if _embedded(config) else None

    def run(op: Callable[[Operations], Awaitable[T]]) -> T:
        async def go() -> T:
            if remote is not None:
                return await op(remote)
            async with direct_operations(config, _actor()) as ops:
                return await op(ops)

        return asyncio.run(go())

    return run


def _embedded(config: LoadedConfig) -> bool:
    return config.settings.store.url.startswith("memory://")


def _cli_logging(level: str = "info") -> None:
    """Log lines of a CLI command go to stderr as JSON: the audit events of a change (level
    info), the errors of a read-only command (level error, such as a damaged geo record).
    stdout is the command's own output (with --json, exactly one JSON document)."""
    from gateway.request_log import configure_logging, set_log_stream

    set_log_stream(sys.stderr)
    configure_logging(level, "json")


def _actor() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return "cli"


# --- keys -------------------------------------------------------------------------------------

def _expires(value: str | None) -> float | None:
    """30d / 12h / 90m / 45s from now, or an ISO 8601 time (UTC when it names no zone)."""
    if value is None:
        return None
    v = value.strip()
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if v[-1:] in units and v[:-1].isdigit():
        return datetime.now(UTC).timestamp() + int(v[:-1]) * units[v[-1:]]
    try:
        dt = datetime.fromisoformat(v.replace("Z", "+00:00"))
    except ValueError:
        _fail(f"--expires {value!r}: use 30d, 12h or an ISO 8601 time", EXIT_USAGE)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


def _limit_arg(value: str) -> int | None:
    """A limit option of `keys update`: a non-negative integer, or `default` (the key's own
    value is removed: the policy's default applies)."""
    if value.strip().lower() == "default":
        return None
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError("a non-negative integer or 'default'") from None
    if n < 0:
        raise argparse.ArgumentTypeError("a non-negative integer or 'default'")
    return n


def _fingerprint(value: str) -> str:
    """`explain --client-cert-sha256`: a SHA-256 certificate fingerprint, normalised."""
    from gateway.policy import normalize_fingerprint

    try:
        return normalize_fingerprint(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
def _quota_arg(value: str) -> tuple[str, int | None]:
    """A `--quota PERIOD.DIMENSION=N` option: (name, N); an empty N or `default` is None (the
    key's own quota is removed: the policy's `limits.key.quotas` applies)."""
    name, eq, raw = value.partition("=")
    name, raw = name.strip(), raw.strip()
    if not eq:
        raise argparse.ArgumentTypeError(f"{value!r}: use PERIOD.DIMENSION=N, e.g. "
                                         "daily.output_tokens=100000")
    try:
        quota_name(name)
    except OperationError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if raw == "" or raw.lower() == "default":
        return name, None
    try:
        n = int(raw)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"quotas.{name}: a non-negative integer, or "
                                         "'default' (or nothing) to remove it")
    return name, n


def _quota_spec(pairs: list[tuple[str, int | None]] | None) -> dict[str, int | None] | None:
    """The `quotas` field of an issue or update from the repeated `--quota` options (the
    last of a name wins); None when there was none."""
    return None if not pairs else dict(pairs)


def _quota_text(quotas: dict[str, Any] | None, sep: str = " ") -> str:
    return sep.join(f"{k}={v}" for k, v in sorted((quotas or {}).items()))


def _print_key(r: dict[str, Any]) -> None:
    """One key for people: scopes, limits and times (ISO 8601, UTC)."""
    limits = r.get("limits") or {}
    rows = [
        ("key_id", r["key_id"]), ("reseller", r["reseller"]), ("status", r["status"]),
        ("name", r.get("name") or "-"),
        ("models", ", ".join(r.get("models") or []) or "any"),
        ("paths", ", ".join(r.get("paths") or []) or "any"),
        ("countries", ", ".join(r.get("countries") or []) or "any (the reseller's)"),
        ("limits", " ".join(f"{k}={limits[k]}" for k in sorted(limits)) or
         "the policy's defaults"),
        ("quotas", _quota_text(r.get("quotas")) or "the policy's defaults"),
        ("expires", _iso(r.get("expires_at")) if r.get("expires_at") else "never"),
        ("created", _iso(r.get("created_at"))), ("updated", _iso(r.get("updated_at"))),
        ("last used", _iso(r.get("last_used_at"))),
    ]
    if r.get("prev_valid_until"):
        rows.append(("old secret valid until", _iso(r["prev_valid_until"])))
    for label, value in rows:
        print(f"{label + ':':<12} {value}")


def cmd_keys(args: argparse.Namespace) -> int:
    config = _load_admin(args)
    run = _operator(config)
    _cli_logging()
    if args.keys_cmd == "issue":
        spec: dict[str, Any] = {"reseller": args.reseller}
        for f in ("name", "models", "paths", "countries", *LIMIT_FIELDS):
            v = getattr(args, f)
            if v is not None:
                spec[f] = v
        exp = _expires(args.expires)
        if exp is not None:
            spec["expires_at"] = exp
        quotas = _quota_spec(args.quota)
        if quotas is not None:
            spec["quotas"] = quotas
        issued = run(lambda ops: ops.issue_key(spec))
        if args.json:
            _print({"key_id": issued.key_id, "key": issued.key})
        else:
            expires = issued.record.get("expires_at")
            print(f"key_id: {issued.key_id}\nreseller: {args.reseller}\n"
                  f"expires: {_iso(expires) if expires else 'never'}\nkey: {issued.key}\n"
                  "(the key is shown this once; only its hash is stored)")
        return 0
    if args.keys_cmd == "update":
        changes: dict[str, Any] = {}
        for f in ("name", "models", "paths", "countries"):
            v = getattr(args, f)
            if v is not None:
                changes[f] = v
        for f in LIMIT_FIELDS:
            if getattr(args, f) is not _UNSET:
                changes[f] = getattr(args, f)
        if args.expires is not None:
            changes["expires_at"] = (None if args.expires.strip().lower() in ("never", "none")
                                     else _expires(args.expires))
        quotas = _quota_spec(args.quota)
        if quotas is not None:
            changes["quotas"] = quotas
        if not changes:
            _fail("nothing to update: give at least one of --name --models --paths "
                  "--countries " + " ".join(f"--{f}" for f in LIMIT_FIELDS) +
                  " --quota --expires", EXIT_USAGE)
        rec = run(lambda ops: ops.update_key(args.key_id, changes))
        if args.json:
            _print(rec)
        else:
            _print_key(rec)
        return 0
    if args.keys_cmd == "list":
        rows = run(lambda ops: ops.list_keys(args.reseller))
        if args.json:
            _print(rows)
        else:
            quota_cells = [_quota_text(r.get("quotas"), ",") or "-" for r in rows]
            width = max([len(q) + 2 for q in quota_cells] + [8])
            print(f"{'KEY_ID':<18}{'RESELLER':<14}{'STATUS':<9}{'NAME':<16}{'LAST_USED':<22}"
                  f"{'QUOTAS':<{width}}EXPIRES")
            for r, q in zip(rows, quota_cells, strict=True):
                exp_s = _iso(r["expires_at"]) if r.get("expires_at") else "-"
                print(f"{r['key_id']:<18}{r['reseller']:<14}{r['status']:<9}"
                      f"{(r.get('name') or '-'):<16}{_iso(r.get('last_used_at')):<22}"
                      f"{q:<{width}}{exp_s}")
        return 0
    if args.keys_cmd == "show":
        rec = run(lambda ops: ops.show_key(args.key_id))
        if args.json:
            _print(rec)
        else:
            _print_key(rec)
        return 0
    if args.keys_cmd == "revoke":
        out = run(lambda ops: ops.revoke_key(args.key_id))
        _print(out) if args.json else print(f"revoked {args.key_id}")
        return 0
    if args.keys_cmd == "rotate":
        rotated = run(lambda ops: ops.rotate_key(args.key_id, args.overlap))
        if args.json:
            _print({"key_id": rotated.key_id, "key": rotated.key})
        else:
            until = rotated.record.get("prev_valid_until")
            print(f"key_id: {rotated.key_id}\nkey: {rotated.key}\n(the old secret keeps "
                  f"working for {args.overlap:g} s" + (f", until {_iso(until)})" if until
                                                       else ")"))
        return 0
    _fail("unknown keys command", EXIT_USAGE)


_UNSET: Any = object()


# --- policy -----------------------------------------------------------------------------------

def _yaml(doc: Any) -> str:
    return yaml.safe_dump(doc, sort_keys=False, default_flow_style=None, width=100)


def cmd_policy(args: argparse.Namespace) -> int:
    from gateway.policy import canonical, load_policy_file

    if args.policy_cmd == "validate":  # a file check: needs no config, secrets or store
        load_policy_file(args.file)
        if args.json:
            _print({"file": args.file, "valid": True})
        else:
            print(f"{args.file}: ok")
        return 0
    config = _load_admin(args)
    run = _operator(config)

    if args.policy_cmd == "show":
        cur = run(lambda ops: ops.get_policy())
        if cur is None:
            _fail("no policy stored yet")
        if args.json:
            _print({"version": cur.version, "applied_at": cur.applied_at,
                    "applied_at_iso": _iso(cur.applied_at), "actor": cur.actor,
                    "policy": cur.policy})
        else:
            print(f"# live policy version {cur.version}\n"
                  f"# applied {_iso(cur.applied_at)} by {cur.actor or '-'}\n"
                  + _yaml(cur.policy), end="")
        return 0
    # apply
    from gateway.policy import require_databases

    doc = load_policy_file(args.file)
    require_databases(doc, config.settings.geo, args.file)
    new = json.loads(canonical(doc))
    cur = run(lambda ops: ops.get_policy())
    old_text = _yaml(cur.policy) if cur else ""
    diff = list(difflib.unified_diff(old_text.splitlines(), _yaml(new).splitlines(),
                                     f"live (v{cur.version})" if cur else "live (none)",
                                     args.file, lineterm=""))
    report: dict[str, Any] = {"file": args.file, "live_version": cur.version if cur else None,
                              "changed": bool(diff), "diff": "\n".join(diff), "applied": False,
                              "version": cur.version if cur else None}
    if not args.json:
        print("\n".join(diff) if diff else "no changes against the live policy")
    if args.dry_run or not diff:
        if args.json:
            _print(report)
        elif args.dry_run:
            print("(dry run: nothing applied)")
        # A dry run that finds a difference exits 1 (as `diff` does): CI can gate on it.
        return EXIT_FAILURE if args.dry_run and diff else 0
    expected = cur.version if cur else 0
    _cli_logging()
    try:
        version = run(lambda ops: ops.put_policy(canonical(doc), expected))
    except OperationError as exc:
        if exc.status == 409:  # another writer applied a version since the diff
            _fail(f"{exc}; re-run to diff against it")
        raise
    if args.json:
        _print({**report, "applied": True, "version": version})
    else:
        print(f"applied policy version {version}")
    return 0


# --- audit ------------------------------------------------------------------------------------

def cmd_audit_verify(path: str) -> int:
    """`gateway audit verify FILE`: 0 when every hash chain in the file is whole, 1 naming the
    first line removed or altered, 2 when the file cannot be read."""
    from gateway.hash_chain import Verified, verify_lines

    try:
        with open(path, encoding="utf-8", errors="surrogateescape", newline="\n") as f:
            result = verify_lines(line.rstrip("\r\n") for line in f)
    except OSError as exc:
        _fail(f"cannot read {path}: {exc.strerror or exc}", EXIT_USAGE)
    if isinstance(result, Verified):
        print(f"ok: {result.lines} lines, {result.chains} chain(s) whole")
        return 0
    print(f"broken: {result}")
    return EXIT_FAILURE


def cmd_audit(args: argparse.Namespace) -> int:
    from gateway.audit import parse_limit, parse_since

    if args.audit_cmd == "verify":
        return cmd_audit_verify(args.file)

    config = _load_admin(args)
    try:
        since = parse_since(args.since) if args.since else None
        limit = parse_limit(str(args.limit))
    except ValueError as exc:
        _fail(str(exc), EXIT_USAGE)
    run = _operator(config)
    _cli_logging("error")
    events = run(lambda ops: ops.list_audit(since, limit))
    if args.json:
        _print({"events": events})
        return 0
    print(f"{'TIME':<22}{'ACTOR':<26}{'ACTION':<25}{'TARGET':<18}DETAILS")
    for e in events:
        when = datetime.fromtimestamp(e["time"], UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        extra = " ".join(f"{k}={v}" for k, v in e.items()
                         if k not in ("time", "time_iso", "actor", "action", "target"))
        print(f"{when:<22}{e['actor']:<26}{e['action']:<25}{e['target']:<18}{extra}".rstrip())
    return 0


# --- report -----------------------------------------------------------------------------------

def cmd_report(args: argparse.Namespace) -> int:
    """`report resellers` / `report reseller R`: the screening report (architecture §15)."""
    from gateway.screening import format_report

    config = _load_admin(args)
    run = _operator(config)
    _cli_logging("error")
    reseller = args.reseller if args.report_cmd == "reseller" else None
    out = run(lambda ops: ops.report(args.since, reseller))
    if args.json:
        _print(out)
    else:
        print(format_report(out))
    return 0


# --- usage ------------------------------------------------------------------------------------

#: The table's column titles, by row field.
_USAGE_TITLES = {"day": "DAY", "reseller": "RESELLER", "key_id": "KEY_ID",
                 "customer_id": "CUSTOMER", "model": "MODEL", "requests": "REQUESTS",
                 "input_tokens": "INPUT_TOKENS", "output_tokens": "OUTPUT_TOKENS"}


def cmd_usage(args: argparse.Namespace) -> int:
    from gateway.usage_report import parse_query

    config = _load_admin(args)
    params = {k: v for k, v in (("since", args.since), ("by", args.by),
                                ("reseller", args.reseller), ("key", args.key),
                                ("customer", args.customer)) if v is not None}
    try:
        query = parse_query(params, time.time())
    except ValueError as exc:
        _fail(str(exc), EXIT_USAGE)
    run = _operator(config)
    _cli_logging("error")
    out = run(lambda ops: ops.usage(query))
    if args.json:
        _print(out, sort_keys=False)  # the rows' fields in their documented order
    elif args.csv:
        _print_usage_csv(out["rows"])
    else:
        _print_usage_table(out, query.since_day, query.until_day)
    return 0


def _print_usage_csv(rows: list[dict[str, Any]]) -> None:
    """One header line of the eight fields, then a line per row; null is empty."""
    from gateway.usage_report import FIELDS

    w = csv.writer(sys.stdout, lineterminator="\n")
    w.writerow(FIELDS)
    for r in rows:
        w.writerow(["" if r[f] is None else r[f] for f in FIELDS])


def _print_usage_table(out: dict[str, Any], since_day: str, until_day: str) -> None:
    """A table for people: the columns that hold a value in some row (a column summed over
    is left out), the counts right-aligned, and a TOTAL line."""
    from gateway.usage_report import COUNTS, FIELDS

    rows: list[dict[str, Any]] = out["rows"]
    shown = [f for f in FIELDS[:5] if any(r[f] is not None for r in rows)] + list(COUNTS)
    cells = [[_USAGE_TITLES[f] for f in shown]]
    cells += [["-" if r[f] is None else str(r[f]) for f in shown] for r in rows]
    idents = len(shown) - len(COUNTS)  # none when there is no row: the totals alone
    cells.append(["TOTAL", *[""] * (idents - 1)][:idents]
                 + [str(out["totals"][c]) for c in COUNTS])
    widths = [max(len(line[i]) for line in cells) for i in range(len(shown))]
    print(f"usage {since_day} to {until_day} (UTC days)")
    for line in cells:
        print("  ".join(v.rjust(w) if f in COUNTS else v.ljust(w)
                        for f, v, w in zip(shown, line, widths, strict=True)).rstrip())


# --- explain ----------------------------------------------------------------------------------

def cmd_explain(args: argparse.Namespace) -> int:
    config = _load_admin(args)
    key = args.key or (None if args.key_id or args.reseller
                       else os.environ.get("GATEWAY_EXPLAIN_KEY"))
    if not (key or args.key_id or args.reseller):
        _fail("give --key-id, --reseller or --key (or set GATEWAY_EXPLAIN_KEY)", EXIT_USAGE)
    query = ExplainQuery(ip=args.ip, key=key, key_id=args.key_id, reseller=args.reseller,
                         customer_ip=args.customer_ip, customer_id=args.customer_id,
                         model=args.model, path=args.path or "/v1/messages",
                         attestation=args.attestation, method=args.method,
                         client_cert_sha256=args.client_cert_sha256)
    run = _operator(config)
    _cli_logging("error")
    out = run(lambda ops: ops.explain(query))
    if args.json:
        _print(out)
    else:
        _print_trace(out)
    return 0 if out["decision"]["decision"] == "allow" else EXIT_FAILURE


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
    cert = (out.get("request") or {}).get("client_cert_sha256")
    if cert:
        print(f"client certificate sha256 {cert}")
    for step in out.get("rules") or []:
        mark = "MATCH" if step["matched"] else "no   "
        why = f"on {step['matched_on']}" if step["matched"] else f"({step['failed_field']})"
        print(f"  rule {step['rule']:<24} {step['action']:<5} {step['mode']:<7} {mark} {why}")
    if out.get("shadow"):
        print(f"shadow (would deny): {', '.join(out['shadow'])}")
    for lim in out.get("limits") or []:
        print(f"  limit {lim['subject']}: " + " ".join(f"{f} {lim[f]}" for f in LIMIT_FIELDS))
    d = out["decision"]
    print(f"decision: {d['decision'].upper()} {d['status']} {d['code'] or ''} at {d['stage']}"
          f"{': ' + d['message'] if d['message'] else ''}")


# --- geo --------------------------------------------------------------------------------------

def cmd_geo(args: argparse.Namespace) -> int:
    from gateway.geo import open_geo

    _cli_logging("error")
    config = _load_admin(args)
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
                             "build_epoch": v["build_epoch"],
                             "build_epoch_iso": _iso(v["build_epoch"]),
                             "found": v["record"] is not None,
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
                  f"({v['database_type']}, built {v['build_epoch_iso']})")
    return 0


#: Commands that moved out of the package to the developer tools of a source checkout
#: (tools/): they say where they went instead of argparse's "invalid choice".
MOVED = {("demo",): "make demo (python -m tools demo)",
         ("geo", "build"): "make geo (python -m tools geo-build)"}


def _moved(argv: list[str]) -> int | None:
    for words, where in MOVED.items():
        if tuple(argv[:len(words)]) == words:
            _stderr_line(f"error: gateway {' '.join(words)} is no longer part of the gateway: "
                         f"in a source checkout, run {where}")
            return EXIT_USAGE
    return None


# --- parser -----------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gateway", description=(__doc__ or "").split("\n\n")[0],
        epilog="exit codes: 0 success; 1 failure or a difference found; 2 usage or config "
               "error. `gateway COMMAND --help` describes a command.")
    p.add_argument("--version", action="version", version=f"gateway {__version__}")
    sub = p.add_subparsers(dest="cmd", metavar="{run,check-config,keys,policy,audit,explain,"
                                               "usage,geo,report}")

    def with_config(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sp.add_argument("--config", default=DEFAULT_CONFIG, help="config file (YAML)")
        sp.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a config field, e.g. --set upstream.url=http://...")
        return sp

    def json_flag(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--json", action="store_true",
                        help="print exactly one JSON document on stdout")

    def group(name: str, text: str, dest: str) -> tuple[argparse.ArgumentParser, Any]:
        g = sub.add_parser(name, help=text, description=text)
        g.set_defaults(group=g, group_dest=dest)
        return g, g.add_subparsers(dest=dest)

    r = with_config(sub.add_parser("run", help="serve the proxy and admin listeners"))
    r.add_argument("--workers", type=int, default=1, help="processes sharing the listener")
    r.set_defaults(fn=cmd_run)
    with_config(sub.add_parser("check-config", help="validate a config file")).set_defaults(
        fn=cmd_check_config)

    k, ks = group("keys", "reseller keys: issue, update, list, show, revoke, rotate",
                  "keys_cmd")
    ki = with_config(ks.add_parser("issue", help="issue a key for a reseller of the live "
                                                 "policy (the key is printed once)"))
    ki.add_argument("--reseller", required=True, help="a reseller named in the live policy")
    ki.add_argument("--name", help="a label for people")

    def scopes(sp: argparse.ArgumentParser, clear: str = "") -> None:
        sp.add_argument("--models", help="comma-separated globs, e.g. 'claude-*'" + clear)
        sp.add_argument("--paths", help="comma-separated path globs, e.g. '/v1/messages/**' "
                        "('*' stays within one segment, '**' spans segments)" + clear)
        sp.add_argument("--countries", help="comma-separated ISO codes (and 'unknown')" + clear)

    def quota(sp: argparse.ArgumentParser, clear: str = "") -> None:
        sp.add_argument("--quota", action="append", type=_quota_arg,
                        metavar="PERIOD.DIMENSION=N",
                        help="the key's own quota (repeatable), e.g. daily.output_tokens=100000"
                             "; periods daily, monthly; dimensions requests, input_tokens, "
                             "output_tokens" + clear)

    scopes(ki)
    for f in LIMIT_FIELDS:
        ki.add_argument(f"--{f}", type=int, help=f"the key's own {f} limit")
    quota(ki)
    ki.add_argument("--expires", help="30d, 12h, or an ISO 8601 time (in the future)")
    json_flag(ki)
    ku = with_config(ks.add_parser(
        "update", help="change a key's scopes, limits or expiry (every instance within a "
                       "second)"))
    ku.add_argument("key_id")
    ku.add_argument("--name", help="a label for people")
    scopes(ku, "; '' removes the scope")
    for f in LIMIT_FIELDS:
        ku.add_argument(f"--{f}", type=_limit_arg, default=_UNSET,
                        help=f"the key's own {f} limit; 'default' = the policy's")
    quota(ku, "; daily.requests=default (or =) removes it: the policy's default applies")
    ku.add_argument("--expires", help="30d, 12h, an ISO 8601 time, or 'never'")
    json_flag(ku)
    kl = with_config(ks.add_parser("list", help="every key (no secrets), oldest first"))
    kl.add_argument("--reseller", help="only this reseller's keys")
    json_flag(kl)
    for name, text in (("show", "one key: scopes, limits, status and times"),
                       ("revoke", "revoke a key (every instance within a second)"),
                       ("rotate", "a new secret for the same key id (printed once)")):
        kx = with_config(ks.add_parser(name, help=text))
        kx.add_argument("key_id")
        json_flag(kx)
        if name == "rotate":
            kx.add_argument("--overlap", type=float, default=3600.0,
                            help="seconds the old secret keeps working (default 3600)")
    k.set_defaults(fn=cmd_keys)

    pol, ps = group("policy", "the policy document: apply, validate, show", "policy_cmd")
    pa = with_config(ps.add_parser("apply", help="push a policy file to the store (shows the "
                                                 "diff against the live policy first)"))
    pa.add_argument("file")
    pa.add_argument("--dry-run", action="store_true",
                    help="show the diff only; exit 1 when the file differs, 0 when equal")
    json_flag(pa)
    pv = with_config(ps.add_parser("validate", help="check a policy file (no store needed)"))
    pv.add_argument("file")
    json_flag(pv)
    psh = with_config(ps.add_parser("show", help="the live policy (YAML, or --json)"))
    json_flag(psh)
    pol.set_defaults(fn=cmd_policy)

    au, aus = group("audit", "the audit trail of administrative changes", "audit_cmd")
    al = with_config(aus.add_parser("list", help="administrative changes, oldest first"))
    al.add_argument("--since", help="24h, 30m, 7d, an ISO 8601 time or Unix seconds "
                                    "(default: all the store keeps)")
    al.add_argument("--limit", type=int, default=1000,
                    help="the newest N events (default 1000, at most 10000)")
    al.add_argument("--json", action="store_true", help='one JSON document {"events": [...]}')
    av = aus.add_parser("verify", help="check a log file's hash chains (log.hash_chain): exit 0 "
                                       "whole, 1 naming the first line removed or altered")
    av.add_argument("file", help="the log file (JSON lines, as the gateway printed them)")
    au.set_defaults(fn=cmd_audit)

    rp, rps = group("report", "reseller screening reports (signals per reseller)", "report_cmd")
    for name, text in (("resellers", "every reseller's signals and breakdowns"),
                       ("reseller", "one reseller's signals and breakdowns")):
        rr = with_config(rps.add_parser(name, help=text))
        if name == "reseller":
            rr.add_argument("reseller", help="the reseller's name in the policy")
        rr.add_argument("--since", help="whole hours or days back, 1h to 7d (default: the "
                                        "policy's screening.window, 24h)")
        json_flag(rr)
    rp.set_defaults(fn=cmd_report)

    e = with_config(sub.add_parser(
        "explain", help="trace the decision for a request (exit 0 allowed, 1 refused)"))
    e.add_argument("--ip", required=True, help="the client address")
    who = e.add_mutually_exclusive_group()
    who.add_argument("--key-id", help="judge this key (its secret is not needed)")
    who.add_argument("--reseller", help="judge as any key of this reseller")
    who.add_argument("--key", help="a full key (or set GATEWAY_EXPLAIN_KEY); prefer --key-id")
    e.add_argument("--customer-ip", help="the attested customer address")
    e.add_argument("--customer-id", help="the attested customer id")
    e.add_argument("--model", help="the requested model")
    e.add_argument("--path", default="/v1/messages", help="the request path")
    e.add_argument("--method", default="POST", help="the request method (default POST)")
    e.add_argument("--attestation", help="an X-Customer-Attestation value, judged now")
    e.add_argument("--client-cert-sha256", type=_fingerprint, metavar="SHA256",
                   help="the connection presented this client certificate (SHA-256 of the "
                        "DER certificate; AB:CD:… accepted)")
    json_flag(e)
    e.set_defaults(fn=cmd_explain)

    u = with_config(sub.add_parser(
        "usage", help="the usage ledger: requests and tokens by day, key, customer, model",
        description="The usage ledger (forwarded requests only, UTC days): one row per day, "
                    "reseller, key, customer and model, or grouped with --by; a table, "
                    "--json or --csv."))
    u.add_argument("--since", help="7d, 24h, an ISO 8601 date or Unix seconds: from that UTC "
                                   "day to today (default 7d)")
    u.add_argument("--reseller", help="only this reseller's use")
    u.add_argument("--key", metavar="KEY_ID", help="only this key's use (a key id)")
    u.add_argument("--customer", help="only this attested customer id's use")
    u.add_argument("--by", choices=("day", "model", "customer"),
                   help="sum per day, per model, or per customer (of its reseller); the "
                        "fields summed over are null")
    fmt = u.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true",
                     help='one JSON document {"rows": [...], "totals": {...}}')
    fmt.add_argument("--csv", action="store_true", help="CSV: a header line, then the rows")
    u.set_defaults(fn=cmd_usage)

    g, gs = group("geo", "geo databases: lookup", "geo_cmd")
    gl = with_config(gs.add_parser("lookup", help="what the gateway knows about an address"))
    gl.add_argument("ip")
    json_flag(gl)
    g.set_defaults(fn=cmd_geo)

    return p


def main(argv: list[str] | None = None) -> int:
    moved = _moved(sys.argv[1:] if argv is None else argv)
    if moved is not None:
        return moved
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.cmd is None:  # a bare `gateway`: its help, as a usage error
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    group = getattr(args, "group", None)
    if group is not None and getattr(args, args.group_dest) is None:
        group.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        code: int = args.fn(args)
    except ConfigError as exc:
        for problem in exc.problems:  # every problem of the file, one line each
            _stderr_line(f"error: {problem.line()}")
        return 2
    except StartupError as exc:
        _stderr_line(f"error: {exc}")
        return EXIT_USAGE
    except CliError as exc:
        _stderr_line(f"error: {exc}")
        return exc.code
    except OperationError as exc:  # a refused input is a usage error, as an HTTP 400 is
        _stderr_line(f"error: {exc}")
        return EXIT_USAGE if exc.status == 400 else EXIT_FAILURE
    return code
