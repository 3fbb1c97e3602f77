"""Tests for tools.geo_build: the committed demo GeoIP databases and their JSON sources."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path
from typing import Any

import maxminddb
import pytest

from tools.geo_build import DEFAULT_BUILD_EPOCH, build_all

GEO = Path(__file__).resolve().parents[2] / "geo" / "demo"
SRC = GEO / "src"
NAMES = ("Demo-Country", "Demo-ASN", "Demo-Anonymous-IP")
DOC_RANGES = [
    ipaddress.ip_network(n)
    for n in ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24", "2001:db8::/32")
]

# address -> (country, registered_country, ASN, anonymizer flags); the table in geo/README.md.
TABLE: dict[str, tuple[str | None, str | None, int | None, set[str]]] = {
    "192.0.2.1": ("US", "US", 64500, set()),
    "192.0.2.17": ("GB", "GB", 64501, set()),
    "192.0.2.33": ("DE", "DE", None, set()),
    "192.0.2.49": ("JP", "JP", None, set()),
    "192.0.2.65": ("FR", "DE", None, set()),
    "198.51.100.1": ("CN", "CN", 64510, set()),
    "198.51.100.17": ("RU", "RU", None, set()),
    "198.51.100.33": ("IR", "IR", None, set()),
    "198.51.100.49": ("KP", "KP", None, set()),
    "198.51.100.65": ("HK", "HK", None, set()),
    "198.51.100.81": ("CU", "CU", None, set()),
    "198.51.100.97": ("SY", "SY", None, set()),
    "198.51.100.113": ("MO", "MO", None, set()),
    "203.0.113.1": ("NL", "NL", 64520, {"is_anonymous_vpn"}),
    "203.0.113.17": ("DE", "DE", None, {"is_tor_exit_node"}),
    "203.0.113.33": ("US", "US", 64521, {"is_hosting_provider"}),
    "203.0.113.49": ("US", "US", None, {"is_public_proxy"}),
    "203.0.113.65": ("US", "US", None, {"is_residential_proxy"}),
    "203.0.113.81": (None, "SG", None, set()),
    "2001:db8:1::1": ("US", "US", 64500, set()),
    "2001:db8:2::1": ("GB", "GB", 64501, set()),
    "2001:db8:86::1": ("CN", "CN", 64510, set()),
    "2001:db8:98::1": ("IR", "IR", None, set()),
    "2001:db8:a::1": ("NL", "NL", 64520, {"is_anonymous_vpn"}),
    # IPv4 networks are also reachable through MaxMind's IPv6 aliases of the IPv4 tree.
    "::ffff:198.51.100.1": ("CN", "CN", 64510, set()),
    "2002:c633:6401::": ("CN", "CN", 64510, set()),
}

UNKNOWN = ["203.0.113.97", "203.0.113.255", "192.0.2.80", "127.0.0.1", "8.8.8.8", "2001:db8:3::1"]


def _get(name: str, ip: str) -> Any:
    with maxminddb.open_database(str(GEO / f"{name}.mmdb")) as reader:
        return reader.get(ip)


def test_build_matches_committed_files(tmp_path: Path) -> None:
    """Building the sources into a fresh directory gives byte-identical files to geo/demo."""
    written = build_all(SRC, tmp_path)
    assert [p.name for p in written] == [f"{n}.mmdb" for n in NAMES]
    for path in written:
        assert path.read_bytes() == (GEO / path.name).read_bytes(), path.name


def test_build_twice_is_identical(tmp_path: Path) -> None:
    """Two builds of the same sources produce the same bytes (no clock in the metadata)."""
    first = [p.read_bytes() for p in build_all(SRC, tmp_path / "a")]
    second = [p.read_bytes() for p in build_all(SRC, tmp_path / "b")]
    assert first == second


def test_metadata_names_type_and_fixed_epoch() -> None:
    """Each database is an IPv6 tree whose type and build epoch come from its source."""
    for name in NAMES:
        source = json.loads((SRC / f"{name}.json").read_text(encoding="utf-8"))
        with maxminddb.open_database(str(GEO / f"{name}.mmdb")) as reader:
            meta = reader.metadata()
        assert meta.database_type == name
        assert meta.ip_version == 6
        assert meta.build_epoch == source.get("build_epoch", DEFAULT_BUILD_EPOCH)


@pytest.mark.parametrize("ip", sorted(TABLE))
def test_lookup_returns_documented_values(ip: str) -> None:
    """Each documented address has the country, registered country, ASN and flags of the table."""
    country, registered, asn, flags = TABLE[ip]
    rec = _get("Demo-Country", ip)
    assert (rec.get("country") or {}).get("iso_code") == country
    assert rec["registered_country"]["iso_code"] == registered
    asn_rec = _get("Demo-ASN", ip)
    assert (asn_rec or {}).get("autonomous_system_number") == asn
    anon = _get("Demo-Anonymous-IP", ip)
    if flags:
        assert anon == {"is_anonymous": True, **{flag: True for flag in flags}}
    else:
        assert anon is None


def test_country_record_has_maxmind_shape() -> None:
    """A Country record carries continent, country and registered_country as GeoIP2 does."""
    assert _get("Demo-Country", "192.0.2.65") == {
        "continent": {"code": "EU", "names": {"en": "Europe"}},
        "country": {"iso_code": "FR", "names": {"en": "France"}, "is_in_european_union": True},
        "registered_country": {
            "iso_code": "DE",
            "names": {"en": "Germany"},
            "is_in_european_union": True,
        },
    }


def test_asn_record_has_maxmind_shape() -> None:
    """An ASN record holds an integer number and the organisation name."""
    rec = _get("Demo-ASN", "203.0.113.33")
    assert rec == {
        "autonomous_system_number": 64521,
        "autonomous_system_organization": "Demo Hosting Inc",
    }
    assert type(rec["autonomous_system_number"]) is int


@pytest.mark.parametrize("ip", UNKNOWN)
def test_unknown_address_is_in_no_database(ip: str) -> None:
    """An address outside the demo ranges is found in none of the three databases."""
    for name in NAMES:
        assert _get(name, ip) is None, name


def test_sources_use_documentation_ranges_only() -> None:
    """Every source network lies inside an IPv4 or IPv6 documentation range."""
    for name in NAMES:
        source = json.loads((SRC / f"{name}.json").read_text(encoding="utf-8"))
        for entry in source["networks"]:
            net = ipaddress.ip_network(entry["network"])
            assert any(
                net.version == doc.version and net.subnet_of(doc)  # type: ignore[arg-type]
                for doc in DOC_RANGES
            ), entry


def _write_sources(src: Path, **override: dict[str, Any]) -> None:
    for name in NAMES:
        doc = json.loads((SRC / f"{name}.json").read_text(encoding="utf-8"))
        doc.update(override.get(name.replace("-", "_"), {}))
        (src / f"{name}.json").write_text(json.dumps(doc), encoding="utf-8")


def test_overlapping_networks_are_rejected(tmp_path: Path) -> None:
    """A source with two overlapping networks is refused, naming the file and entry."""
    nets = [
        {"network": "192.0.2.0/24", "flags": ["vpn"]},
        {"network": "192.0.2.8/29", "flags": ["tor"]},
    ]
    _write_sources(tmp_path, Demo_Anonymous_IP={"networks": nets})
    with pytest.raises(ValueError, match=r"Demo-Anonymous-IP\.json: networks\[1\]: .*overlaps"):
        build_all(tmp_path, tmp_path / "out")


def test_wrong_database_type_is_rejected(tmp_path: Path) -> None:
    """A source whose database_type lacks the word the gateway checks for is refused."""
    _write_sources(tmp_path, Demo_ASN={"database_type": "Demo-Country"})
    with pytest.raises(ValueError, match=r"Demo-ASN\.json: database_type"):
        build_all(tmp_path, tmp_path / "out")


def test_unknown_key_is_rejected(tmp_path: Path) -> None:
    """A misspelt field in a network entry is refused rather than ignored."""
    nets = [{"network": "192.0.2.0/28", "contry": "US"}]
    _write_sources(tmp_path, Demo_Country={"networks": nets})
    with pytest.raises(ValueError, match=r"networks\[0\]: unknown key\(s\) contry"):
        build_all(tmp_path, tmp_path / "out")
