"""Build the demo GeoIP databases (MaxMind DB format) from readable JSON sources.

The output is reproducible: the same sources always give byte-identical `.mmdb` files.
The source format is documented in geo/README.md.
"""

from __future__ import annotations

import ipaddress
import json
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The `geo-build` extra: without it `make geo` says so and exits 2.
from mmdb_writer import MmdbU32, MMDBWriter
from netaddr import IPSet

from gateway.geo import ANONYMIZER_FLAGS, TYPE_WORDS

# Used when a source has no top-level "build_epoch": a constant, never the clock (2025-11-24).
DEFAULT_BUILD_EPOCH = 1764000000

# MaxMind aliases these IPv6 ranges to the IPv4 tree (which lives at ::/96), so an IPv4
# network is also found through its IPv4-mapped, Teredo and 6to4 forms. (prefix, prefixlen)
_IPV4_ALIASES: tuple[tuple[int, int], ...] = (
    (0, 96),  # ::a.b.c.d, the IPv4 tree itself
    (0xFFFF << 32, 96),  # ::ffff:a.b.c.d
    (0x2001 << 112, 32),  # 2001:0:a.b.c.d:: (Teredo)
    (0x2002 << 112, 16),  # 2002:a.b.c.d:: (6to4)
)

# Policy anonymizer names (docs/architecture.md §4) to the GeoIP2 Anonymous IP record fields:
# the gateway's own map (gateway/geo.py), read the other way round.
ANONYMIZER_FIELDS: Mapping[str, str] = {name: field for field, name in ANONYMIZER_FLAGS}

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_RecordFn = Callable[[Mapping[str, Any], str], dict[str, Any]]


@dataclass(frozen=True)
class _Kind:
    """One database: its source/output name, the words its type may contain (the gateway's
    own check, gateway/geo.py), its record keys."""

    name: str
    type_words: tuple[str, ...]
    top_keys: frozenset[str]
    network_keys: frozenset[str]


_COMMON_TOP = frozenset({"database_type", "description", "build_epoch", "networks"})
_COUNTRY = _Kind(
    "Demo-Country",
    TYPE_WORDS["country"],
    _COMMON_TOP | {"countries", "continents"},
    frozenset({"network", "country", "registered_country", "note"}),
)
_ASN = _Kind(
    "Demo-ASN",
    TYPE_WORDS["asn"],
    _COMMON_TOP,
    frozenset({"network", "asn", "organization", "note"}),
)
_ANONYMOUS_IP = _Kind(
    "Demo-Anonymous-IP",
    TYPE_WORDS["anonymous_ip"],
    _COMMON_TOP,
    frozenset({"network", "flags", "note"}),
)


def build_all(src_dir: Path, out_dir: Path) -> list[Path]:
    """Build Demo-Country, Demo-ASN and Demo-Anonymous-IP `.mmdb` files; return their paths.

    Reads `<name>.json` from `src_dir` and writes `<name>.mmdb` into `out_dir` (created if
    missing), each file replaced atomically. Raises ValueError naming the source file and
    entry when a source is malformed.
    """
    # Every source is checked before any file is written, so a bad source changes nothing.
    kinds = (_COUNTRY, _ASN, _ANONYMOUS_IP)
    writers = [_writer_for(kind, src_dir / f"{kind.name}.json") for kind in kinds]
    out_dir.mkdir(parents=True, exist_ok=True)
    return [
        _write(writer, out_dir / f"{kind.name}.mmdb")
        for kind, writer in zip(kinds, writers, strict=True)
    ]


def _writer_for(kind: _Kind, src: Path) -> MMDBWriter:
    """Read and check one source; return a writer holding its whole tree."""
    doc = _load(src)
    where = src.name
    _check_keys(doc, kind.top_keys, where)
    db_type = _get_str(doc, "database_type", where)
    if not any(word in db_type for word in kind.type_words):
        raise ValueError(
            f"{where}: database_type: {db_type!r} must contain {' or '.join(kind.type_words)}"
        )
    description = _get_str(doc, "description", where)
    epoch = doc.get("build_epoch", DEFAULT_BUILD_EPOCH)
    if type(epoch) is not int or epoch < 0:
        raise ValueError(f"{where}: build_epoch: must be a non-negative integer")

    make_record = _country_record_fn(doc, where) if kind is _COUNTRY else _RECORD_FNS[kind.name]
    writer = _FixedEpochWriter(
        epoch,
        ip_version=6,
        database_type=db_type,
        languages=["en"],
        description={"en": description},
    )
    for net, entry, at in _networks(doc, kind, where):
        record = make_record(entry, at)
        for alias in _ipv6_forms(net):
            writer.insert_network(IPSet([str(alias)]), record)
    return writer


def _write(writer: MMDBWriter, out: Path) -> Path:
    # Write beside the target and rename, so a gateway polling the file never reads half of it.
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        writer.to_db_file(str(tmp))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


class _FixedEpochWriter(MMDBWriter):
    """MMDBWriter whose metadata carries a given build_epoch instead of the current time.

    mmdb-writer stamps `int(time.time())` in `_build_meta`; this is the one override point.
    """

    def __init__(self, build_epoch: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._build_epoch = build_epoch

    def _build_meta(self) -> dict[str, Any]:
        return {**super()._build_meta(), "build_epoch": self._build_epoch}


def _load(src: Path) -> dict[str, Any]:
    try:
        doc = json.loads(src.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{src.name}: not valid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise ValueError(f"{src.name}: top level must be an object")
    return doc


def _check_keys(obj: Mapping[str, Any], allowed: frozenset[str], where: str) -> None:
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}")


def _get_str(obj: Mapping[str, Any], key: str, where: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not value:
        raise ValueError(f"{where}: {key}: must be a non-empty string")
    return value


def _networks(
    doc: Mapping[str, Any], kind: _Kind, where: str
) -> Iterator[tuple[_Network, Mapping[str, Any], str]]:
    """Yield (network, entry, location) per entry; reject bad or overlapping networks."""
    entries = doc.get("networks")
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{where}: networks: must be a non-empty list")
    seen: list[tuple[_Network, str]] = []
    for i, entry in enumerate(entries):
        at = f"{where}: networks[{i}]"
        if not isinstance(entry, dict):
            raise ValueError(f"{at}: must be an object")
        _check_keys(entry, kind.network_keys, at)
        try:
            net = ipaddress.ip_network(_get_str(entry, "network", at))
        except ValueError as exc:
            raise ValueError(f"{at}: network: {exc}") from exc
        for other, other_at in seen:
            if net.version == other.version and net.overlaps(other):
                raise ValueError(f"{at}: network {net} overlaps {other} ({other_at})")
        seen.append((net, at))
        yield net, entry, at


def _ipv6_forms(net: _Network) -> list[ipaddress.IPv6Network]:
    """An IPv6 network as is; an IPv4 network under ::/96 and MaxMind's IPv4 aliases."""
    if isinstance(net, ipaddress.IPv6Network):
        return [net]
    addr = int(net.network_address)
    return [
        ipaddress.IPv6Network((prefix | addr << (128 - plen - 32), plen + net.prefixlen))
        for prefix, plen in _IPV4_ALIASES
    ]


def _country_record_fn(doc: Mapping[str, Any], where: str) -> _RecordFn:
    """Return a function turning a Country source entry into a GeoIP2 Country record."""
    continents = doc.get("continents")
    countries = doc.get("countries")
    if not isinstance(continents, dict) or not isinstance(countries, dict):
        raise ValueError(f"{where}: countries and continents: must both be objects")
    for code, name in continents.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"{where}: continents.{code}: must be a non-empty string")
    for code, info in countries.items():
        at = f"{where}: countries.{code}"
        if not isinstance(info, dict):
            raise ValueError(f"{at}: must be an object")
        _check_keys(info, frozenset({"name", "continent", "is_in_european_union"}), at)
        _get_str(info, "name", at)
        if info.get("continent") not in continents:
            raise ValueError(f"{at}: continent: not one of {', '.join(sorted(continents))}")

    def country(code: object, at: str) -> dict[str, Any]:
        if not isinstance(code, str) or code not in countries:
            raise ValueError(f"{at}: unknown country {code!r}; add it to countries")
        info = countries[code]
        record: dict[str, Any] = {"iso_code": code, "names": {"en": info["name"]}}
        if info.get("is_in_european_union") is True:
            record["is_in_european_union"] = True
        return record

    def make(entry: Mapping[str, Any], at: str) -> dict[str, Any]:
        code = entry.get("country")
        registered = entry.get("registered_country", code)
        if code is None and registered is None:
            raise ValueError(f"{at}: needs country or registered_country")
        record: dict[str, Any] = {}
        if code is not None:
            record["country"] = country(code, f"{at}: country")
            cont = countries[code]["continent"]
            record["continent"] = {"code": cont, "names": {"en": continents[cont]}}
        record["registered_country"] = country(registered, f"{at}: registered_country")
        return record

    return make


def _asn_record(entry: Mapping[str, Any], at: str) -> dict[str, Any]:
    asn = entry.get("asn")
    if type(asn) is not int or not 0 < asn < 2**32:
        raise ValueError(f"{at}: asn: must be an integer in 1..4294967295")
    # uint32, as in MaxMind's ASN databases (mmdb-writer would otherwise pick uint16).
    return {
        "autonomous_system_number": MmdbU32(asn),
        "autonomous_system_organization": _get_str(entry, "organization", at),
    }


def _anonymous_ip_record(entry: Mapping[str, Any], at: str) -> dict[str, Any]:
    flags = entry.get("flags")
    if not isinstance(flags, list) or not flags:
        raise ValueError(f"{at}: flags: must be a non-empty list")
    record: dict[str, Any] = {"is_anonymous": True}
    for flag in flags:
        if flag not in ANONYMIZER_FIELDS:
            raise ValueError(
                f"{at}: flags: unknown {flag!r}, expected one of {', '.join(ANONYMIZER_FIELDS)}"
            )
        record[ANONYMIZER_FIELDS[flag]] = True
    return record


_RECORD_FNS: Mapping[str, _RecordFn] = {
    _ASN.name: _asn_record,
    _ANONYMOUS_IP.name: _anonymous_ip_record,
}
