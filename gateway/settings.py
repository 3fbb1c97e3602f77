"""Gateway configuration: the typed schema of docs/architecture.md §3 and its one loader.

`gateway run` and `gateway check-config` both call `load_settings`; an invalid file raises
`ConfigError` naming the file, the offending field and the reason.
"""

from __future__ import annotations

import ipaddress
import os
import re
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)


class ConfigError(Exception):
    """A config or policy file that cannot be used; the message names file, field and reason.

    One error may carry others found in the same pass (`also`): `problems` lists them all, and
    the message has one line per problem, so an operator fixes a file in one round."""

    def __init__(self, file: str, field: str, reason: str,
                 also: tuple[ConfigError, ...] = ()) -> None:
        self.file = file
        self.field = field
        self.reason = reason
        self.also = also
        super().__init__("\n".join(p.line() for p in self.problems))

    @property
    def problems(self) -> tuple[ConfigError, ...]:
        return (self, *self.also)

    def line(self) -> str:
        """This problem alone, on one line: "file: field: reason"."""
        where = f"{self.file}: {self.field}" if self.field else self.file
        return f"{where}: {self.reason}"

    @classmethod
    def of(cls, errors: list[ConfigError]) -> ConfigError:
        """One error carrying every problem of `errors` (at least one), in order."""
        problems = [p for e in errors for p in e.problems]
        first = problems[0]
        return cls(first.file, first.field, first.reason, tuple(
            cls(p.file, p.field, p.reason) for p in problems[1:]))


class StartupError(Exception):
    """The gateway cannot start for a reason outside the file (a port in use); the message is
    one line, e.g. "listen 0.0.0.0:8080: address already in use"."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a mapping naming the same key twice (plain YAML keeps the last,
    silently). Every duplicate of the document is reported, by key path and line."""

    def get_single_data(self) -> Any:
        node = self.get_single_node()
        if node is None:
            return None
        dups: list[tuple[str, int, int]] = []
        _find_duplicates(node, "", dups, set())
        if dups:
            raise _DuplicateKeys(dups)
        return self.construct_document(node)


class _DuplicateKeys(Exception):
    def __init__(self, dups: list[tuple[str, int, int]]) -> None:
        self.dups = dups


def _find_duplicates(node: yaml.Node, path: str, out: list[tuple[str, int, int]],
                     seen: set[int]) -> None:
    if id(node) in seen:  # an alias: walked once (also guards recursive anchors)
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        first: dict[tuple[str, str], int] = {}
        for key, value in node.value:
            if not isinstance(key, yaml.ScalarNode) or key.tag == "tag:yaml.org,2002:merge":
                continue
            name = str(key.value)
            where = f"{path}.{name}" if path else name
            line = key.start_mark.line + 1
            ident = (key.tag, name)
            if ident in first:
                out.append((where, line, first[ident]))
            else:
                first[ident] = line
            _find_duplicates(value, where, out, seen)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _find_duplicates(item, f"{path}[{i}]", out, seen)


def load_yaml(text: str, source: str) -> Any:
    """Parse a YAML document with safe types; raise ConfigError naming `source` for invalid
    YAML (on one line, with its position) or for keys given twice (every one, by path)."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass: safe types
    except _DuplicateKeys as exc:
        raise ConfigError.of([
            ConfigError(source, where, f"duplicate key at line {line} (first at line {first})")
            for where, line, first in exc.dups]) from None
    except yaml.YAMLError as exc:
        raise ConfigError(source, "", f"not valid YAML: {_yaml_reason(exc)}") from None


def _yaml_reason(exc: yaml.YAMLError) -> str:
    if isinstance(exc, yaml.MarkedYAMLError):
        what = " ".join(x for x in (exc.context, exc.problem) if x) or "syntax error"
        mark = exc.problem_mark or exc.context_mark
        if mark is not None:
            return f"{what} (line {mark.line + 1}, column {mark.column + 1})"
        return what
    return " ".join(str(exc).split())


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def parse_hostport(value: str) -> tuple[str, int]:
    """Split "host:port" / "[v6]:port" into its parts; raise ValueError when malformed."""
    host, sep, port_s = value.rpartition(":")
    if not sep or not port_s.isdigit():
        raise ValueError(f"expected host:port, got {value!r}")
    port = int(port_s)
    if not 0 <= port <= 65535:
        raise ValueError(f"port out of range in {value!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host:
        raise ValueError(f"missing host in {value!r}")
    if ":" in host:
        ipaddress.IPv6Address(host)  # raises ValueError on garbage
    return host, port


_SECRET_PARAM = re.compile(r"pass|pwd|secret|token|auth|key|credential", re.IGNORECASE)
_HOST = re.compile(r"(\[[0-9A-Fa-f:.]*\]|[A-Za-z0-9._-]*)(:[0-9]*)?")


def redact_url(url: str) -> str:
    """`url` fit to log or print: the password of every user-info (several hosts included, as in
    sentinel URLs) and the value of every credential-like query parameter become `***`.
    Anything that cannot be told apart from a credential is redacted too."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return "***" if "@" in url else url
    # Split where the client libraries split (urlsplit); whatever a password with a raw
    # delimiter pushes into the path or fragment is redacted there.
    end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    netloc, tail = rest[:end], rest[end:]
    parts = netloc.split(",")
    last_at = max((i for i, p in enumerate(parts) if "@" in p), default=-1)
    shown = []
    for i, part in enumerate(parts):
        if "@" in part:
            creds, _, host = part.rpartition("@")
            user, colon, _ = creds.partition(":")
            shown.append(f"{user}:***@{host}" if colon and _HOST.fullmatch(user) else
                         f"***@{host}")
        elif i < last_at or not _HOST.fullmatch(part):
            shown.append("***")  # a piece of a password (one that held a comma or a slash)
        else:
            shown.append(part)
    netloc = ",".join(shown)
    tail, h, frag = tail.partition("#")
    path, q, query = tail.partition("?")
    if "@" in frag:
        frag = "***"
    if "@" in path:
        path = "/***"
    if q:
        items = []
        for item in query.split("&"):
            name, eq, _ = item.partition("=")
            # An "@" means user-info a raw "?" in a password pushed into the query.
            secret = _SECRET_PARAM.search(unquote(name)) or "@" in item
            items.append(f"{name}=***" if eq and secret else "***" if secret else item)
        path = f"{path}?{'&'.join(items)}"
    return f"{scheme}://{netloc}{path}{h}{frag}"


class UpstreamSettings(_Model):
    url: str = "https://api.anthropic.com"
    # Egress (docs/architecture.md §3): a CA bundle the upstream's certificate is verified
    # against instead of the system's; trust_env: HTTPS_PROXY / NO_PROXY from the environment.
    ca_file: str | None = None
    trust_env: bool = False
    api_key_env: str = "UPSTREAM_API_KEY"
    auth_header: Literal["x-api-key", "authorization"] = "x-api-key"
    connect_timeout_s: float = Field(default=5.0, gt=0)
    read_timeout_s: float = Field(default=600.0, gt=0)
    max_body_bytes: int = Field(default=32 * 1024 * 1024, gt=0)
    max_connections: int = Field(default=1000, gt=0)

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"must be an http(s) URL with a host, got {redact_url(v)!r}")
        return v.rstrip("/")


class StoreSettings(_Model):
    url: str = "memory://"
    key_prefix: str = "gw:"
    on_error: Literal["closed", "open"] = "closed"
    fallback_instances: int = Field(default=1, ge=1)
    timeout_s: float = Field(default=1.0, gt=0)
    sync_interval_s: float = Field(default=1.0, gt=0)

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        scheme = urlsplit(v).scheme
        allowed = ("memory", "redis", "rediss", "redis+sentinel", "redis+cluster", "unix")
        if scheme not in allowed:
            shown = f"{scheme}://…" if scheme else "a URL without a scheme"
            raise ValueError(f"scheme must be one of {', '.join(allowed)}, got {shown}")
        # The embedded store: `memory://` (ephemeral) or `memory:///abs/state.json` (persisted).
        if scheme == "memory" and (urlsplit(v).netloc or not v.startswith("memory://")):
            raise ValueError("memory:// takes no host; a state file is an absolute path: "
                             "memory:///var/lib/gateway/state.json")
        return v


class ClientIPSettings(_Model):
    trusted_proxies: list[str] = Field(default_factory=lambda: ["127.0.0.0/8", "::1/128"])
    header: str = "X-Forwarded-For"
    recursive: bool = True
    # PROXY protocol on the proxy listener (docs/architecture.md §2): off, or the versions
    # accepted from the peers in proxy_protocol_from, within proxy_protocol_timeout_s.
    proxy_protocol: Literal["off", "v1", "v2", "any"] = "off"
    proxy_protocol_from: list[str] = Field(default_factory=list)
    proxy_protocol_timeout_s: float = Field(default=5.0, gt=0, le=60)

    @field_validator("proxy_protocol", mode="before")
    @classmethod
    def _yaml_off(cls, v: Any) -> Any:
        return "off" if v is False else v  # YAML 1.1 reads a bare `off` as false

    @field_validator("trusted_proxies", "proxy_protocol_from")
    @classmethod
    def _cidrs(cls, v: list[str]) -> list[str]:
        for cidr in v:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError as exc:
                raise ValueError(f"not an IP network: {cidr!r}") from exc
        return v

    @model_validator(mode="after")
    def _proxy_protocol_peers(self) -> ClientIPSettings:
        if self.proxy_protocol != "off" and not self.proxy_protocol_from:
            raise ValueError(f"proxy_protocol: {self.proxy_protocol} needs proxy_protocol_from "
                             "(the load balancers' networks)")
        return self


class GeoSettings(_Model):
    """The MaxMind databases (docs/architecture.md §3). Only `country_db` is required; a
    database not named is not used (no bundled fallback), and the bundled `Demo-*` databases
    are refused unless `allow_demo_databases` says this is the demo."""

    country_db: str
    asn_db: str | None = None
    anonymous_ip_db: str | None = None
    allow_demo_databases: bool = False
    max_age_days: float = Field(default=35.0, gt=0)
    cache_size: int = Field(default=65536, ge=0)
    reload_interval_s: float = Field(default=30.0, gt=0)


class CustomerSettings(_Model):
    id_header: str = "X-Customer-Id"
    ip_header: str = "X-Customer-IP"


class LogSettings(_Model):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "console"] = "json"
    #: every line carries `chain_id`, `prev_hash` and `hash` (docs/logs.md "Hash chain")
    hash_chain: bool = False

    @field_validator("hash_chain")
    @classmethod
    def _json_only(cls, v: bool, info: ValidationInfo) -> bool:
        if v and info.data.get("format") == "console":
            raise ValueError("needs log.format: json (the chain is over JSON lines)")
        return v


class ServerSettings(_Model):
    """Bounds on what a client may hold of the proxy listener (docs/architecture.md §3)."""

    header_timeout_s: float = Field(default=10.0, gt=0)
    body_timeout_s: float = Field(default=60.0, gt=0)
    idle_timeout_s: float = Field(default=75.0, gt=0)
    max_connections: int = Field(default=10000, gt=0)
    max_inflight_body_bytes: int = Field(default=256 * 1024 * 1024, gt=0)


class TracingSettings(_Model):
    """OpenTelemetry spans per proxy request (docs/architecture.md §7); needs the `otel` extra.
    Read at start (a reload does not change them)."""

    enabled: bool = False
    exporter: Literal["otlp", "none"] = "otlp"
    # None: the exporter's own default / OTEL_EXPORTER_OTLP_TRACES_ENDPOINT.
    otlp_endpoint: str | None = None
    service_name: str = "model-gateway"
    sample_ratio: float = Field(default=1.0, ge=0, le=1)


class TLSSettings(_Model):
    """TLS on the proxy listener (docs/architecture.md §3): the certificate and key (PEM),
    reloaded on SIGHUP and when the files change; optionally the CA whose client certificates
    the listener asks for (`require_client_cert`: refuse a handshake without one)."""

    cert_file: str
    key_file: str
    client_ca_file: str | None = None
    require_client_cert: bool = False
    reload_interval_s: float = Field(default=10.0, gt=0)  # how often to look at the files

    @field_validator("require_client_cert")
    @classmethod
    def _needs_ca(cls, v: bool, info: ValidationInfo) -> bool:
        if v and not info.data.get("client_ca_file"):
            raise ValueError("require_client_cert: true needs a client_ca_file (the CA that "
                             "signs the client certificates)")
        return v


class UsageSettings(_Model):
    """The usage ledger (docs/architecture.md §12)."""

    #: UTC days the ledger keeps each day's cells
    retention_days: int = Field(default=400, gt=0)


class Settings(_Model):
    listen: str = "0.0.0.0:8080"
    tls: TLSSettings | None = None  # TLS on the proxy listener (none: plain HTTP)
    admin_listen: str = "127.0.0.1:9090"
    admin_token_env: str = "GATEWAY_ADMIN_TOKEN"
    upstream: UpstreamSettings = Field(default_factory=UpstreamSettings)
    store: StoreSettings = Field(default_factory=StoreSettings)
    client_ip: ClientIPSettings = Field(default_factory=ClientIPSettings)
    geo: GeoSettings
    customer: CustomerSettings = Field(default_factory=CustomerSettings)
    policy_file: str | None = "policy.yaml"
    # store: the store's policy is live, the file seeds an empty store (and is compared);
    # file: the file is the source of truth, applied at start and on SIGHUP.
    policy_source: Literal["store", "file"] = "store"
    limits_headers: Literal["auto", "anthropic", "openai"] = "auto"  # auto: by the path's API
    server: ServerSettings = Field(default_factory=ServerSettings)
    shutdown_drain_s: float = Field(default=5.0, ge=0)
    shutdown_grace_s: float = Field(default=30.0, ge=0)
    log: LogSettings = Field(default_factory=LogSettings)
    tracing: TracingSettings = Field(default_factory=TracingSettings)
    usage: UsageSettings = Field(default_factory=UsageSettings)

    @field_validator("policy_source")
    @classmethod
    def _policy_source(cls, v: str, info: ValidationInfo) -> str:
        if v == "file" and not info.data.get("policy_file"):
            raise ValueError("policy_source: file needs a policy_file")
        return v

    @field_validator("listen", "admin_listen")
    @classmethod
    def _hostport(cls, v: str) -> str:
        parse_hostport(v)
        return v

    def listen_clash(self) -> str | None:
        """Why `admin_listen` cannot be bound beside `listen` (the same port on overlapping
        addresses), or None. Port 0 asks the OS for a free port, so it never clashes."""
        host, port = parse_hostport(self.listen)
        ahost, aport = parse_hostport(self.admin_listen)
        if port == 0 or port != aport:
            return None
        wildcard = ("0.0.0.0", "::", "*")
        if host == ahost or host in wildcard or ahost in wildcard:
            return (f"{self.admin_listen} overlaps listen {self.listen}: the admin listener "
                    "needs a port of its own")
        return None

    def warnings(self) -> list[tuple[str, str]]:
        """(field, reason) of settings that are valid but probably a mistake."""
        out = []
        for cidr in self.client_ip.trusted_proxies:
            if ipaddress.ip_network(cidr, strict=False).prefixlen == 0:
                out.append(("client_ip.trusted_proxies",
                            f"{cidr} trusts every peer: any client can choose the address it "
                            "is located and limited by (X-Forwarded-For)"))
        for cidr in self.client_ip.proxy_protocol_from:
            if ipaddress.ip_network(cidr, strict=False).prefixlen == 0:
                out.append(("client_ip.proxy_protocol_from",
                            f"{cidr} trusts every peer: any client can choose the address it "
                            "is located and limited by (PROXY protocol)"))
        return out


class Secrets(BaseModel):
    """Secrets read from the environment variables the config names; never logged."""

    model_config = ConfigDict(frozen=True)
    upstream_api_key: str
    admin_token: str

    def __repr__(self) -> str:
        return "Secrets(<redacted>)"

    __str__ = __repr__


class LoadedConfig(BaseModel):
    """A validated config: settings with resolved paths, the secrets and where it came from."""

    model_config = ConfigDict(frozen=True)
    path: str
    settings: Settings
    secrets: Secrets
    #: "file: field: reason" lines for valid but suspicious settings (shown, never fatal)
    warnings: tuple[str, ...] = ()

    def __repr__(self) -> str:
        return f"LoadedConfig(path={self.path!r})"


def ca_file_problem(ca_file: str | None) -> str | None:
    """Why `ca_file` cannot verify the upstream (unreadable, no PEM certificate), or None."""
    if not ca_file:
        return None
    try:
        ssl.create_default_context(cafile=ca_file)
    except ssl.SSLError:  # an OSError too: first
        return f"{ca_file} holds no PEM certificate"
    except OSError as exc:
        return f"cannot read {ca_file}: {(exc.strerror or str(exc)).lower()}"
    return None


def _set_path(doc: dict[str, Any], dotted: str, value: Any) -> None:
    node = doc
    parts = dotted.split(".")
    for part in parts[:-1]:
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ValueError(f"{part} is not a section")
        node = nxt
    node[parts[-1]] = value


def resolve_relative(base_file: str, value: str) -> str:
    """Resolve a path named in a file against that file's directory (absolute paths unchanged)."""
    p = Path(value)
    if p.is_absolute():
        return str(p)
    return os.path.normpath(str(Path(base_file).resolve().parent / p))


def load_settings(
    path: str,
    overrides: list[str] | None = None,
    environ: dict[str, str] | None = None,
    require_secrets: bool = True,
) -> LoadedConfig:
    """Load, validate and resolve a config file; `overrides` are "dotted.field=yaml-value" pairs.

    Raises ConfigError naming the file, the field and the reason on any problem, including a
    missing environment variable for a secret; every problem found is in it (`problems`).
    With `require_secrets=False` (every command but `run`) an unset secret is left empty: the
    command that needs one checks it itself.
    """
    env = os.environ if environ is None else environ
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(path, "", f"cannot read: {exc.strerror or exc}") from exc
    raw = load_yaml(text, path)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(path, "", "top level must be a mapping")
    for item in overrides or ():
        key, sep, val = item.partition("=")
        if not sep or not key:
            raise ConfigError(path, key or item, "override must look like field.path=value")
        try:
            value = yaml.safe_load(val)
        except yaml.YAMLError:
            value = val  # not YAML (e.g. "[::1]:8080"): take it as a plain string
        try:
            _set_path(raw, key, value)
        except ValueError as exc:
            raise ConfigError(path, key, str(exc)) from exc
    if raw.get("geo") is None:
        raw["geo"] = {}  # so that a missing database is named: geo.country_db
    try:
        settings = Settings.model_validate(raw)
    except ValidationError as exc:
        raise validation_error(path, exc) from None
    settings = _resolve_paths(path, settings)
    errors = []
    clash = settings.listen_clash()
    if clash:
        errors.append(ConfigError(path, "admin_listen", clash))
    if settings.tls is not None and settings.client_ip.proxy_protocol != "off":
        # The PROXY header comes in clear before the TLS handshake; this listener reads it
        # above TLS, so the two together would fail every handshake: refuse, not break.
        errors.append(ConfigError(path, "client_ip.proxy_protocol", (
            "cannot be used with tls: end TLS at the load balancer that sends the PROXY "
            "header, or turn one of them off")))
    ca_problem = ca_file_problem(settings.upstream.ca_file)
    if ca_problem:
        errors.append(ConfigError(path, "upstream.ca_file", ca_problem))
    secrets = {}
    for field, var in (
        ("upstream.api_key_env", settings.upstream.api_key_env),
        ("admin_token_env", settings.admin_token_env),
    ):
        value = env.get(var, "")
        if not value and require_secrets:
            errors.append(ConfigError(path, field, f"environment variable {var} is not set"))
        secrets[field] = value
    if errors:
        raise ConfigError.of(errors)
    return LoadedConfig(
        path=str(Path(path)),
        settings=settings,
        secrets=Secrets(
            upstream_api_key=secrets["upstream.api_key_env"],
            admin_token=secrets["admin_token_env"],
        ),
        warnings=tuple(f"{path}: {field}: {reason}" for field, reason in settings.warnings()),
    )


# What a missing field is, where its name alone does not say.
_MISSING_HINTS = {
    "geo.country_db": " (the path of a GeoIP2 or GeoLite2 Country or City database)",
}


def _dotted(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(p) for p in loc)


def validation_error(source: str, exc: ValidationError,
                     where: Callable[[tuple[int | str, ...]], str] = _dotted) -> ConfigError:
    """The ConfigError of a pydantic ValidationError, for the config and the policy alike: one
    problem per pydantic error, in order, each naming `source`, the field (`where` of the
    error's location, dotted by default; "(top level)" when empty) and the reason in our
    words ("unknown field", "required field is missing", a validator's own message)."""
    problems = []
    for err in exc.errors():
        field = where(err["loc"]) or "(top level)"
        msg = str(err["msg"])
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        elif err["type"] == "missing":
            msg = "required field is missing" + _MISSING_HINTS.get(field, "")
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        problems.append(ConfigError(source, field, msg))
    return ConfigError.of(problems)


def _resolve_paths(path: str, s: Settings) -> Settings:
    geo = s.geo.model_copy(
        update={
            "country_db": resolve_relative(path, s.geo.country_db),
            "asn_db": resolve_relative(path, s.geo.asn_db) if s.geo.asn_db else None,
            "anonymous_ip_db": (
                resolve_relative(path, s.geo.anonymous_ip_db) if s.geo.anonymous_ip_db else None
            ),
        }
    )
    policy_file = resolve_relative(path, s.policy_file) if s.policy_file else None
    upstream = s.upstream
    if upstream.ca_file:
        upstream = upstream.model_copy(update={"ca_file": resolve_relative(path, upstream.ca_file)})
    tls = None if s.tls is None else s.tls.model_copy(update={
        "cert_file": resolve_relative(path, s.tls.cert_file),
        "key_file": resolve_relative(path, s.tls.key_file),
        "client_ca_file": (resolve_relative(path, s.tls.client_ca_file)
                           if s.tls.client_ca_file else None)})
    return s.model_copy(update={"geo": geo, "policy_file": policy_file, "upstream": upstream,
                                "tls": tls})
