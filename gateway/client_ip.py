"""The real client address from the peer and a forwarding header, with nginx realip semantics.

`set_real_ip_from` = `trusted_proxies`, `real_ip_recursive` = `recursive`. Parsing never raises
and never yields an address that is neither the peer nor in the header.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Literal

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Walk at most this many hops of a forwarding header; a longer chain stops there (nginx would
# keep going, but a hundred trusted hops is an attack, not a topology).
MAX_HOPS = 64
MAX_HEADER_LEN = 16 * 1024
_CACHE_MAX = 16384


def _port(s: str) -> bool:
    return 0 < len(s) <= 5 and s.isascii() and s.isdigit() and int(s) <= 65535


def parse_addr(token: str) -> str | None:
    """Normalise one forwarding element to an address string, or None when it is not one.

    Accepts `1.2.3.4`, `1.2.3.4:80`, `::1`, `[::1]`, `[::1]:80`; refuses zone ids, names,
    `unknown`, obfuscated RFC 7239 identifiers and anything else.
    """
    t = token.strip()
    if not t or len(t) > 64 or "%" in t:
        return None
    if t.startswith("["):
        end = t.find("]")
        if end < 0:
            return None
        rest = t[end + 1 :]
        if rest and not (rest.startswith(":") and _port(rest[1:])):
            return None
        try:
            v6 = ipaddress.IPv6Address(t[1:end])
        except ValueError:
            return None
        return str(v6.ipv4_mapped) if v6.ipv4_mapped is not None else str(v6)
    if t.count(":") == 1:  # IPv4 with a port
        host, _, port = t.partition(":")
        if not _port(port):
            return None
        t = host
    try:
        addr = ipaddress.ip_address(t)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


def _forwarded_for(value: str) -> list[str]:
    """The `for=` values of an RFC 7239 Forwarded header, left to right (garbage kept as-is)."""
    out: list[str] = []
    for element in value.split(","):
        found = ""
        for pair in element.split(";"):
            name, eq, val = pair.partition("=")
            if eq and name.strip().lower() == "for":
                found = val.strip().strip('"')
        # An element without for= is not an address: it stops the walk like garbage does.
        out.append(found if found or not element.strip() else "-")
    return out


@dataclass(frozen=True, slots=True)
class Resolution:
    """Where the client address came from: `peer`, or the header at `hop` (0 = rightmost)."""

    client_ip: str
    source: Literal["peer", "header"]
    hop: int


class ClientIPResolver:
    """Resolves client addresses; trusted networks are parsed once, per config."""

    def __init__(self, trusted: list[str], header: str = "X-Forwarded-For",
                 recursive: bool = True) -> None:
        self.networks = tuple(ipaddress.ip_network(c, strict=False) for c in trusted)
        self.header = header
        self.recursive = recursive
        self.rfc7239 = header.lower() == "forwarded"
        self._trusted_cache: dict[str, bool] = {}
        self._norm_cache: dict[str, str] = {}
        self._resolve_cache: dict[tuple[str, str], Resolution] = {}

    def is_trusted(self, ip: str) -> bool:
        """Whether `ip` (a normalised address string) is a trusted proxy; cached."""
        hit = self._trusted_cache.get(ip)
        if hit is not None:
            return hit
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        result = any(addr.version == n.version and addr in n for n in self.networks)
        if len(self._trusted_cache) >= _CACHE_MAX:
            self._trusted_cache.clear()
        self._trusted_cache[ip] = result
        return result

    def normalize(self, peer: str) -> str:
        """The peer address in canonical form (cached: peers repeat)."""
        hit = self._norm_cache.get(peer)
        if hit is None:
            hit = parse_addr(peer) or peer
            if len(self._norm_cache) >= _CACHE_MAX:
                self._norm_cache.clear()
            self._norm_cache[peer] = hit
        return hit

    def resolve(self, peer: str, header_values: list[str]) -> Resolution:
        """nginx realip: from an untrusted peer the header is ignored; otherwise walk it right to
        left while the current address is trusted (only one step unless `recursive`), stopping
        at the first malformed element. Results are cached per (peer, header)."""
        if not header_values:
            return Resolution(self.normalize(peer), "peer", -1)
        key = (peer, header_values[0] if len(header_values) == 1 else ",".join(header_values))
        hit = self._resolve_cache.get(key)
        if hit is None:
            hit = self._resolve(peer, header_values)
            if len(self._resolve_cache) >= _CACHE_MAX:
                self._resolve_cache.clear()
            self._resolve_cache[key] = hit
        return hit

    def _resolve(self, peer: str, header_values: list[str]) -> Resolution:
        peer_norm = self.normalize(peer)
        if not header_values or not self.is_trusted(peer_norm):
            return Resolution(peer_norm, "peer", -1)
        joined = ",".join(header_values)
        if len(joined) > MAX_HEADER_LEN:
            joined = joined[-MAX_HEADER_LEN:]
            # The cut may have split the leftmost element; drop it.
            joined = joined.partition(",")[2]
        elems = _forwarded_for(joined) if self.rfc7239 else joined.split(",")
        current = peer_norm
        source: Literal["peer", "header"] = "peer"
        hop = -1
        n = 0
        for raw in reversed(elems):
            if not raw.strip():
                continue  # empty elements are skipped, as nginx skips ", ,"
            if n >= MAX_HOPS:
                break
            addr = parse_addr(raw)
            if addr is None:
                break
            current, source, hop = addr, "header", n
            n += 1
            if not self.recursive or not self.is_trusted(addr):
                break
        return Resolution(current, source, hop)
