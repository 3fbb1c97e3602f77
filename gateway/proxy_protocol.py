"""The PROXY protocol header, v1 (text) and v2 (binary), as HAProxy's proxy-protocol.txt
specifies it: a pure parser from bytes (docs/architecture.md §2, `client_ip.proxy_protocol`).

`sniff` says whether a connection's first bytes are a header (and which version); `parse`
returns a frozen `ProxyHeader`, None while the header is incomplete, or raises
`ProxyHeaderError` (a ValueError) whose `reason` is one of `REASONS`, a bounded metric label.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Literal

V1_PREFIX = b"PROXY "
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
#: the longest v1 line, CRLF included (proxy-protocol.txt §2.1)
V1_MAX = 107
V2_FIXED = 16
#: address block sizes of v2's INET, INET6 and UNIX families
_V2_ADDR_LEN = {1: 12, 2: 36, 3: 216}

#: Why a header was refused: `signature` (a trusted peer's first bytes are no header),
#: `version`, `command`, `family` (an address family or transport the gateway cannot use),
#: `address` (a bad v1 address or port, a short v2 address block), `malformed` (v1 syntax).
#: The listener adds `untrusted` and `timeout`.
REASONS = ("signature", "version", "command", "family", "address", "malformed",
           "untrusted", "timeout")


class ProxyHeaderError(ValueError):
    """A PROXY header that must be refused; `reason` is one of `REASONS`."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """A parsed header. `source` is None when the connection's own peer stays the peer (v2
    LOCAL, as health checks send; v2 UNSPEC; v1 UNKNOWN). `length`: bytes the header took."""

    version: Literal[1, 2]
    length: int
    family: Literal["tcp4", "tcp6"] | None = None
    source: str | None = None
    source_port: int | None = None
    destination: str | None = None
    destination_port: int | None = None


def sniff(data: bytes) -> Literal[0, 1, 2] | None:
    """1 or 2 when `data` starts with a v1 or v2 header's signature, 0 when it cannot (it is
    something else, such as an HTTP request), None while too few bytes have arrived to say."""
    for version, sig in ((1, V1_PREFIX), (2, V2_SIGNATURE)):
        n = min(len(data), len(sig))
        if data[:n] == sig[:n]:
            if n == len(sig):
                return version  # type: ignore[return-value]
            return None
    return 0


def parse(data: bytes) -> ProxyHeader | None:
    """The header at the start of `data`; None while incomplete. Raises ProxyHeaderError."""
    kind = sniff(data)
    if kind is None:
        return None
    if kind == 0:
        raise ProxyHeaderError("signature", "not a PROXY protocol header")
    return _parse_v1(data) if kind == 1 else _parse_v2(data)


def _port(text: str) -> int:
    if not (0 < len(text) <= 5 and text.isascii() and text.isdigit()) or (
            len(text) > 1 and text[0] == "0") or int(text) > 65535:
        raise ProxyHeaderError("address", f"bad port {text[:8]!r}")
    return int(text)


def _parse_v1(data: bytes) -> ProxyHeader | None:
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(data) >= V1_MAX or b"\n" in data[:V1_MAX]:
            raise ProxyHeaderError("malformed", "v1 header without CRLF in 107 bytes")
        return None
    try:
        line = data[:end].decode("ascii")
    except UnicodeDecodeError:
        raise ProxyHeaderError("malformed", "v1 header is not ASCII") from None
    parts = line.split(" ")
    if len(parts) >= 2 and parts[1] == "UNKNOWN":
        return ProxyHeader(version=1, length=end + 2)  # the rest of the line is ignored
    if len(parts) < 2 or parts[1] not in ("TCP4", "TCP6"):
        if len(parts) >= 2 and parts[1] and parts[1].isalnum():
            raise ProxyHeaderError("family", f"v1 protocol {parts[1][:8]!r} is not TCP4/TCP6")
        raise ProxyHeaderError("malformed", "v1 header has no protocol")
    if len(parts) != 6:
        raise ProxyHeaderError("malformed", "v1 header needs exactly 6 fields")
    cls = ipaddress.IPv4Address if parts[1] == "TCP4" else ipaddress.IPv6Address
    try:
        src, dst = cls(parts[2]), cls(parts[3])
    except ValueError:
        raise ProxyHeaderError("address", f"bad {parts[1]} address") from None
    if "%" in parts[2] or "%" in parts[3]:
        raise ProxyHeaderError("address", "zone ids are not addresses")
    return ProxyHeader(version=1, length=end + 2,
                       family="tcp4" if parts[1] == "TCP4" else "tcp6",
                       source=str(src), source_port=_port(parts[4]),
                       destination=str(dst), destination_port=_port(parts[5]))


def _parse_v2(data: bytes) -> ProxyHeader | None:
    if len(data) < V2_FIXED:
        return None
    ver_cmd, fam = data[12], data[13]
    if ver_cmd >> 4 != 2:
        raise ProxyHeaderError("version", f"v2 version nibble is {ver_cmd >> 4}, not 2")
    command = ver_cmd & 0x0F
    if command > 1:
        raise ProxyHeaderError("command", f"v2 command {command} is neither LOCAL nor PROXY")
    size = int.from_bytes(data[14:16], "big")
    total = V2_FIXED + size
    if len(data) < total:
        return None
    if command == 0:  # LOCAL: the sender's own connection (a health check); no addresses
        return ProxyHeader(version=2, length=total)
    family, transport = fam >> 4, fam & 0x0F
    if fam == 0x00:  # UNSPEC: the receiver uses the real connection's addresses
        return ProxyHeader(version=2, length=total)
    if family not in (1, 2) or transport != 1:
        raise ProxyHeaderError("family", f"v2 family/transport 0x{fam:02x} is not TCP over "
                               "IPv4 or IPv6")
    need = _V2_ADDR_LEN[family]
    if size < need:
        raise ProxyHeaderError("address", f"v2 address block of {size} bytes, {need} needed")
    block = data[V2_FIXED:V2_FIXED + need]
    n = 4 if family == 1 else 16
    cls = ipaddress.IPv4Address if family == 1 else ipaddress.IPv6Address
    src, dst = cls(block[0:n]), cls(block[n:2 * n])
    ports = block[2 * n:2 * n + 4]
    return ProxyHeader(version=2, length=total, family="tcp4" if family == 1 else "tcp6",
                       source=str(src), source_port=int.from_bytes(ports[0:2], "big"),
                       destination=str(dst), destination_port=int.from_bytes(ports[2:4], "big"))


def v1_header(source: str, destination: str, source_port: int, destination_port: int) -> bytes:
    """A v1 header line (for tests and tools)."""
    fam = "TCP6" if ":" in source else "TCP4"
    return f"PROXY {fam} {source} {destination} {source_port} {destination_port}\r\n".encode()


def v2_header(source: str | None, destination: str | None = None, source_port: int = 0,
              destination_port: int = 0, *, local: bool = False, tlvs: bytes = b"") -> bytes:
    """A v2 header: PROXY over TCP4/TCP6 for `source`, or LOCAL (for tests and tools)."""
    if local or source is None:
        return V2_SIGNATURE + bytes([0x20, 0x00]) + len(tlvs).to_bytes(2, "big") + tlvs
    src = ipaddress.ip_address(source)
    dst = ipaddress.ip_address(destination or ("::1" if src.version == 6 else "127.0.0.1"))
    block = (src.packed + dst.packed + source_port.to_bytes(2, "big")
             + destination_port.to_bytes(2, "big") + tlvs)
    fam = 0x11 if src.version == 4 else 0x21
    return V2_SIGNATURE + bytes([0x21, fam]) + len(block).to_bytes(2, "big") + block
