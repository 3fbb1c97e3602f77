"""What one request is judged against: the parts derived once per config version and the
`Snapshot` (those parts, geo, keys, policy) the pipeline reads once per request."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.client_ip import ClientIPResolver
from gateway.geo import GeoResolver
from gateway.identity import KeyRegistry
from gateway.policy import CompiledPolicy
from gateway.proxy import Upstream
from gateway.settings import LoadedConfig


@dataclass(frozen=True, slots=True, eq=False)
class ConfigParts:
    """Everything derived once per config version (built whole on reload, never patched)."""

    config: LoadedConfig
    ip: ClientIPResolver
    upstream: Upstream
    customer_id_header: str
    customer_ip_header: str
    max_body: int
    body_timeout_s: float


def build_config_parts(config: LoadedConfig) -> ConfigParts:
    """The parts of `config`; opens a new upstream session (the caller closes it)."""
    s = config.settings
    return ConfigParts(
        config=config,
        ip=ClientIPResolver(s.client_ip.trusted_proxies, s.client_ip.header, s.client_ip.recursive),
        upstream=Upstream(
            s.upstream.url, config.secrets.upstream_api_key, s.upstream.auth_header,
            s.upstream.connect_timeout_s, s.upstream.read_timeout_s, s.upstream.max_connections,
            frozenset({s.customer.id_header.lower(), s.customer.ip_header.lower()}),
            ca_file=s.upstream.ca_file, trust_env=s.upstream.trust_env,
        ),
        customer_id_header=s.customer.id_header,
        customer_ip_header=s.customer.ip_header,
        max_body=s.upstream.max_body_bytes,
        body_timeout_s=s.server.body_timeout_s,
    )


@dataclass(frozen=True, slots=True, eq=False)
class Snapshot:
    """The config parts, geo resolver, key registry and policy in force, as one value.

    A change (a reload, a new geo resolver, a new policy version) builds a new Snapshot and
    swaps the one reference to it, so a request that read the snapshot once sees one
    consistent state throughout. The key registry is the one object whose records change in
    place (one key at a time, each change whole). Compared and hashed by identity."""

    parts: ConfigParts
    geo: GeoResolver
    registry: KeyRegistry
    policy: CompiledPolicy | None = None
