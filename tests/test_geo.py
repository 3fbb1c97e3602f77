"""Tests for gateway.geo: demo databases refused unless allowed, what a load says of a database
(type, build date, age), staleness, and a database file deleted under the resolver."""

from __future__ import annotations

import shutil
from datetime import datetime
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from gateway.geo import GeoDatabaseError, GeoResolver, age_days, build_date, open_database, open_geo
from gateway.settings import ConfigError, GeoSettings

DEMO = Path(__file__).resolve().parents[1] / "geo" / "demo"
COUNTRY = DEMO / "Demo-Country.mmdb"
DEMO_EPOCH = 1764000000  # gateway.geo_build.DEFAULT_BUILD_EPOCH: 2025-11-24T16:00:00Z


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
