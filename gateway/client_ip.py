"""The real client address from the peer and a forwarding header, with nginx realip semantics.

`set_real_ip_from` = `trusted_proxies`, `real_ip_recursive` = `recursive`. Parsing never raises
and never yields an address that is neither the peer nor in the header.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

from gateway.lru import BoundedLRU

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Walk at most this many hops of a forwarding header; a longer chain stops there (nginx would
# keep going, but a hundred trusted hops is an attack, not a topology).
MAX_HOPS = 64
MAX_HEADER_LEN = 16 * 1024
_CACHE_MAX = 16384
_CACHE_KEY_MAX = 512
_ADDR_MAX = 64  # the longest address form parse_addr accepts ([v6 with v4 tail]:port)


def _port(s: str) -> bool:
    return 0 < len(s) <= 5 and s.isascii() and s.isdigit() and int(s) <= 65535


def parse_addr(token: str) -> str | None:
    """Normalise one forwarding element to an address string, or None when it is not one.

    Accepts `1.2.3.4`, `1.2.3.4:80`, `::1`, `[::1]`, `[::1]:80`; refuses zone ids, names,
    `unknown`, obfuscated RFC 7239 identifiers and anything else. Results are cached (the
    same addresses come back request after request; ipaddress parsing costs several µs),
    for tokens of at most _ADDR_MAX characters, at most _CACHE_MAX of them.
    """
    if len(token) > _ADDR_MAX:
        return _parse_addr(token)  # longer is no address unless padded: never cached
    return _parse_addr_cached(token)


def _parse_addr(token: str) -> str | None:
    t = token.strip(" \t")
    if not t or len(t) > _ADDR_MAX or "%" in t:
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


_parse_addr_cached = functools.lru_cache(maxsize=_CACHE_MAX)(_parse_addr)


# RFC 7239 §4 / RFC 7230 §3.2.6: a pair is token "=" (token / quoted-string); pairs are
# separated by ';' (HTTP whitespace around it tolerated); an empty pair is allowed. Possessive
# quantifiers: nothing is given back, so a long run of whitespace costs linear time.
_PAIR = re.compile(
    r'[ \t]*+(?:([!#$%&\'*+.^_`|~0-9A-Za-z-]+)='
    r'([!#$%&\'*+.^_`|~0-9A-Za-z-]+|"(?:[\t !#-\[\]-~\x80-\xff]|\\[\t -~\x80-\xff])*+"))?'
    r"[ \t]*+(;|\Z)")
_QUOTED_PAIR = re.compile(r"\\(.)", re.DOTALL)
_OBFPORT = re.compile(r"_[A-Za-z0-9._-]+")


def _element_for(element: str) -> str | None:
    """The `for=` value of one well-formed Forwarded element; None when the element is
    malformed, names a parameter twice, or has no `for=`."""
    seen: set[str] = set()
    found: str | None = None
    pos = 0
    while True:
        m = _PAIR.match(element, pos)
        if m is None:
            return None
        name, value, sep = m.group(1), m.group(2), m.group(3)
        if name is not None:
            lname = name.lower()
            if lname in seen:
                return None
            seen.add(lname)
            if lname == "for":
                found = _QUOTED_PAIR.sub(r"\1", value[1:-1]) if value.startswith('"') else value
        if not sep:
            return found
        pos = m.end()


def _node_addr(node: str) -> str | None:
    """The address of an RFC 7239 §6 node (`192.0.2.1`, `192.0.2.1:80`, `[2001:db8::1]:80`,
    either with an obfuscated port); None for `unknown`, obfuscated names and anything else."""
    if len(node) > 64 or "%" in node:
        return None
    if node.startswith("["):
        host, bracket, rest = node[1:].partition("]")
        if not bracket:
            return None
    else:
        host, colon, port = node.partition(":")
        rest = colon + port
    if rest and not (rest[0] == ":" and (_port(rest[1:]) or _OBFPORT.fullmatch(rest[1:]))):
        return None
    try:
        addr: IPAddress = (ipaddress.IPv6Address(host) if node.startswith("[")
                           else ipaddress.IPv4Address(host))
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


def _backslashes_before(s: str, i: int) -> int:
    n = 0
    while i - n - 1 >= 0 and s[i - n - 1] == "\\":
        n += 1
    return n


def _forwarded_from_right(value: str, cut: bool) -> Iterator[str | None]:
    """The `for=` addresses of a Forwarded header from the right; None for an element that is
    not a well-formed element with an address in `for=` (the walk stops there).

    Elements are split from the right, tracking quoted-strings backwards, so whatever a client
    put on the left (an unterminated quote, say) cannot swallow the elements that proxies
    appended to its right; each element is then parsed left to right. `cut` says the header was
    shortened on the left, so an element reaching its start is incomplete."""
    end = len(value)
    while end > 0:
        j = end - 1
        quoted = False
        while j >= 0:
            c = value[j]
            if c == '"':
                odd = _backslashes_before(value, j) % 2 == 1
                if not quoted:
                    if odd:  # a closing quote that a backslash escapes: not one
                        yield None
                        return
                    quoted = True
                elif not odd:
                    quoted = False
            elif c == "," and not quoted:
                break
            j -= 1
        if quoted or (j < 0 and cut):
            yield None
            return
        element = value[j + 1 : end]
        if element.strip(" \t"):
            found = _element_for(element)
            yield None if found is None else _node_addr(found)
        end = j
        if j < 0:
            return


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
        self._trusted_cache: BoundedLRU[str, bool] = BoundedLRU(_CACHE_MAX)
        self._resolve_cache: BoundedLRU[tuple[str, str], Resolution] = BoundedLRU(_CACHE_MAX)

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
        self._trusted_cache.put(ip, result)
        return result

    def normalize(self, peer: str) -> str:
        """The peer address in canonical form (parse_addr caches: peers repeat)."""
        return parse_addr(peer) or peer

    def resolve(self, peer: str, header_values: list[str]) -> Resolution:
        """nginx realip: from an untrusted peer the header is ignored; otherwise walk it right to
        left while the current address is trusted (only one step unless `recursive`), stopping
        at the first malformed element. Results are cached per (peer, header)."""
        if not header_values:
            return Resolution(self.normalize(peer), "peer", -1)
        key = (peer, header_values[0] if len(header_values) == 1 else ",".join(header_values))
        if len(key[1]) > _CACHE_KEY_MAX:
            # Real chains are short; a long header is judged afresh rather than kept, so
            # hostile headers cannot fill the cache with kilobytes each.
            return self._resolve(peer, header_values)
        hit = self._resolve_cache.get(key)
        if hit is None:
            hit = self._resolve(peer, header_values)
            self._resolve_cache.put(key, hit)
        return hit

    def _resolve(self, peer: str, header_values: list[str]) -> Resolution:
        peer_norm = self.normalize(peer)
        if not header_values or not self.is_trusted(peer_norm):
            return Resolution(peer_norm, "peer", -1)
        joined = ",".join(header_values)
        cut = len(joined) > MAX_HEADER_LEN
        if cut:
            joined = joined[-MAX_HEADER_LEN:]
        hops = _forwarded_from_right(joined, cut) if self.rfc7239 else _xff_from_right(joined, cut)
        current = peer_norm
        source: Literal["peer", "header"] = "peer"
        hop = -1
        for n, addr in enumerate(hops):
            if n >= MAX_HOPS or addr is None:
                break
            current, source, hop = addr, "header", n
            if not self.recursive or not self.is_trusted(addr):
                break
        return Resolution(current, source, hop)


def _xff_from_right(value: str, cut: bool) -> Iterator[str | None]:
    """The X-Forwarded-For addresses from the right, empty elements skipped (as nginx skips
    ", ,"); None for an element that is not an address. `cut` says the header was shortened on
    the left: its leftmost element may be a fragment and is never read."""
    elements = value.split(",")
    if cut:
        elements = elements[1:]
    for raw in reversed(elements):
        if raw.strip(" \t"):
            yield parse_addr(raw)
