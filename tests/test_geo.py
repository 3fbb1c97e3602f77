"""Tests for gateway.geo: demo databases refused unless allowed, a database of the wrong type
for its role refused (at load and at reload), what a load says of a database (type, build date,
age), staleness, a database file deleted under the resolver, and the typed records of
`explain`."""

from __future__ import annotations

import shutil
from datetime import datetime
from pathlib import Path

import geoip2.errors
import geoip2.models
import pytest
from structlog.testing import capture_logs

from gateway.geo import (
    GeoDatabaseError,
    GeoDatabaseTypeError,
    GeoResolver,
    age_days,
    build_date,
    open_database,
    open_geo,
    typed_record,
)
from gateway.settings import ConfigError, GeoSettings

DEMO = Path(__file__).resolve().parents[1] / "geo" / "demo"
COUNTRY = DEMO / "Demo-Country.mmdb"
DEMO_EPOCH = 1764000000  # tools.geo_build.DEFAULT_BUILD_EPOCH: 2025-11-24T16:00:00Z
TEST_GEO = Path(__file__).resolve().parents[1] / "tests" / "data" / "geoip"
MM_COUNTRY = TEST_GEO / "GeoIP2-Country-Test.mmdb"
MM_ASN = TEST_GEO / "GeoLite2-ASN-Test.mmdb"
MM_ANON = TEST_GEO / "GeoIP2-Anonymous-IP-Test.mmdb"


def test_demo_database_refused_unless_allowed() -> None:
    """A Demo-* database is refused by default, naming the setting that allows it."""
    with pytest.raises(GeoDatabaseError, match=r"geo\.allow_demo_databases: true"):
        open_database("country", str(COUNTRY))
    db = open_database("country", str(COUNTRY), allow_demo=True)
    assert db.database_type == "Demo-Country"
    db.reader.close()


def test_open_geo_names_every_unusable_database() -> None:
    """open_geo raises one ConfigError naming each refused database by its config field."""
    geo = GeoSettings(country_db=str(COUNTRY), asn_db=str(DEMO / "Demo-ASN.mmdb"),
                      anonymous_ip_db=str(DEMO / "Demo-Anonymous-IP.mmdb"))
    with pytest.raises(ConfigError) as info:
        open_geo(geo, "gw.yaml")
    assert [p.field for p in info.value.problems] == [
        "geo.country_db", "geo.asn_db", "geo.anonymous_ip_db"]
    assert all(p.file == "gw.yaml" and "demo database" in p.reason
               for p in info.value.problems)
    allowed = open_geo(geo.model_copy(update={"allow_demo_databases": True}), "gw.yaml")
    assert set(allowed.dbs) == {"country", "asn", "anonymous_ip"}
    allowed.close()


def test_loaded_event_says_type_build_date_and_age() -> None:
    """geo_database_loaded carries the database type, its build date in ISO 8601 and its age
    in days."""
    with capture_logs() as logs:
        geo = GeoResolver(str(COUNTRY), allow_demo=True)
    geo.close()
    [loaded] = [x for x in logs if x["event"] == "geo_database_loaded"]
    assert loaded["database_type"] == "Demo-Country"
    assert loaded["build_epoch"] == DEMO_EPOCH
    assert loaded["build_date"] == "2025-11-24T16:00:00Z"
    assert datetime.fromisoformat(loaded["build_date"]).timestamp() == DEMO_EPOCH
    assert loaded["age_days"] >= 0 and isinstance(loaded["age_days"], float)
    assert build_date(0) == "1970-01-01T00:00:00Z"
    assert age_days(DEMO_EPOCH, now=DEMO_EPOCH + 36 * 86400 + 8640) == 36.1


def test_status_marks_a_database_older_than_max_age_stale() -> None:
    """status() says each database's age and whether it is past max_age_days."""
    geo = GeoResolver(str(COUNTRY), allow_demo=True)
    try:
        fresh = geo.status(35, now=DEMO_EPOCH + 35 * 86400)["country"]
        old = geo.status(35, now=DEMO_EPOCH + 35 * 86400 + 9000)["country"]
    finally:
        geo.close()
    assert (fresh["age_days"], fresh["stale"], fresh["missing"]) == (35.0, False, False)
    assert (old["age_days"], old["stale"]) == (35.1, True)
    assert old["build_date"] == "2025-11-24T16:00:00Z"


def test_deleted_file_is_logged_once_and_the_copy_keeps_serving(tmp_path: Path) -> None:
    """A database file deleted under the resolver is logged once (geo_database_missing); the
    copy in service keeps answering; the file put back is loaded again."""
    live = tmp_path / "Country.mmdb"
    shutil.copyfile(COUNTRY, live)
    geo = GeoResolver(str(live), allow_demo=True)
    try:
        live.unlink()
        with capture_logs() as logs:
            assert geo.check_reload() == []
            assert geo.check_reload() == []
        [missing] = [x for x in logs if x["event"] == "geo_database_missing"]
        assert (missing["database"], missing["path"]) == ("country", str(live))
        assert missing["log_level"] == "error" and missing["build_epoch"] == DEMO_EPOCH
        assert geo.status(36500)["country"]["missing"] is True
        assert geo.lookup("192.0.2.1").country == "US"
        shutil.copyfile(COUNTRY, live)
        with capture_logs() as logs:
            assert geo.check_reload() == ["country"]
        assert [x["event"] for x in logs] == ["geo_database_loaded"]
        assert geo.status(36500)["country"]["missing"] is False
    finally:
        geo.close()


@pytest.mark.parametrize(("kind", "path", "found", "expected"), [
    ("country", MM_ASN, "GeoLite2-ASN", "*-Country or *-City"),
    ("asn", MM_COUNTRY, "GeoIP2-Country", "*-ASN"),
    ("anonymous_ip", MM_ASN, "GeoLite2-ASN", "*-Anonymous-IP"),
    ("asn", DEMO / "Demo-Anonymous-IP.mmdb", "Demo-Anonymous-IP", "*-ASN"),
])
def test_a_database_of_the_wrong_type_is_refused_naming_file_and_type(
        kind: str, path: Path, found: str, expected: str) -> None:
    """A database whose type does not fit its role is a GeoDatabaseTypeError naming the file,
    the type found and the types the role takes (checked before the demo-data rule)."""
    with pytest.raises(GeoDatabaseTypeError) as info:
        open_database(kind, str(path), allow_demo=True)
    err = info.value
    assert (err.kind, err.path, err.found) == (kind, str(path), found)
    assert str(path) in str(err) and repr(found) in str(err) and expected in str(err)
    assert isinstance(err, GeoDatabaseError)


def test_open_geo_reports_a_wrong_type_as_a_config_error_of_its_field() -> None:
    """open_geo turns a database of the wrong type into a ConfigError on its config field."""
    geo = GeoSettings(country_db=str(MM_COUNTRY), asn_db=str(MM_ANON))
    with pytest.raises(ConfigError) as info:
        open_geo(geo, "gw.yaml")
    [problem] = info.value.problems
    assert problem.field == "geo.asn_db"
    assert "'GeoIP2-Anonymous-IP' database, not a asn database" in problem.reason


def test_a_wrong_type_replacement_never_replaces_a_good_database(tmp_path: Path) -> None:
    """An ASN file renamed over the country database is refused at reload (logged once, with
    the type found) and the database in service keeps answering."""
    live = tmp_path / "Country.mmdb"
    shutil.copyfile(MM_COUNTRY, live)
    geo = GeoResolver(str(live))
    try:
        wrong = tmp_path / "wrong.mmdb"
        shutil.copyfile(MM_ASN, wrong)
        wrong.replace(live)
        with capture_logs() as logs:
            assert geo.check_reload() == []
            assert geo.check_reload() == []
        [rejected] = [x for x in logs if x["event"] == "geo_database_rejected"]
        assert rejected["database"] == "country" and "'GeoLite2-ASN'" in rejected["reason"]
        assert geo.dbs["country"].database_type == "GeoIP2-Country"
        assert geo.lookup("81.2.69.160").country == "GB"
    finally:
        geo.close()


def test_explain_gives_typed_records_and_the_prefix_of_each_network() -> None:
    """explain() answers with geoip2's models (Country, ASN, AnonymousIP) and the prefix
    length of the network found; an address a database lacks has no record but the prefix of
    the empty network; a malformed address has neither."""
    geo = GeoResolver(str(MM_COUNTRY), str(MM_ASN), str(MM_ANON))
    try:
        found = geo.explain("81.2.69.160")
        anon = geo.explain("1.124.213.1")["anonymous_ip"]
        asn = geo.explain("1.128.0.1")["asn"]
        bad = geo.explain("not-an-address")
    finally:
        geo.close()
    country = found["country"]["record"]
    assert isinstance(country, geoip2.models.Country)
    assert (country.country.iso_code, country.registered_country.iso_code) == ("GB", "US")
    assert found["country"]["prefix_len"] == 27
    assert found["country"]["database_type"] == "GeoIP2-Country"
    assert found["asn"]["record"] is None and found["asn"]["prefix_len"] == 9
    assert isinstance(asn["record"], geoip2.models.ASN)
    assert asn["record"].autonomous_system_number == 1221 and asn["prefix_len"] == 11
    assert isinstance(anon["record"], geoip2.models.AnonymousIP)
    assert anon["record"].is_anonymous is True
    assert all(v["record"] is None and v["prefix_len"] is None for v in bad.values())


def test_typed_record_raises_address_not_found_with_its_network() -> None:
    """typed_record raises geoip2's AddressNotFoundError for an address the database lacks,
    carrying the empty network; a Demo-* database gives typed records like MaxMind's own."""
    geo = GeoResolver(str(MM_COUNTRY), str(MM_ASN))
    demo = open_database("asn", str(DEMO / "Demo-ASN.mmdb"), allow_demo=True)
    try:
        with pytest.raises(geoip2.errors.AddressNotFoundError) as info:
            typed_record(geo.dbs["asn"].reader, "asn", "GeoLite2-ASN", "1.1.1.1")
        assert str(info.value.network) == "1.1.0.0/16"
        rec = typed_record(demo.reader, "asn", demo.database_type, "192.0.2.1")
    finally:
        geo.close()
        demo.reader.close()
    assert isinstance(rec, geoip2.models.ASN) and rec.autonomous_system_number == 64500


def test_peek_answers_as_lookup_without_counting() -> None:
    """peek gives lookup's answer for a cached and an uncached address and leaves the cache
    statistics alone."""
    from gateway.geo import GeoResolver
    from tests.support.gateway import REPO

    demo = REPO / "geo" / "demo"
    geo = GeoResolver(str(demo / "Demo-Country.mmdb"), str(demo / "Demo-ASN.mmdb"),
                      str(demo / "Demo-Anonymous-IP.mmdb"), allow_demo=True)
    try:
        first = geo.lookup("203.0.113.1")
        counts = (geo.cache_hits, geo.cache_misses)
        assert geo.peek("203.0.113.1") == first and first.anonymizer == ("vpn",)
        assert geo.peek("192.0.2.1").asn_org == "Demo Cloud US"
        assert (geo.cache_hits, geo.cache_misses) == counts
    finally:
        geo.close()
