"""Geo lookups: country, ASN and anonymizer flags from MaxMind databases, cached and hot-reloaded.

Only the country database is required. The bundled `Demo-*` databases (`make geo`) are
refused unless the caller allows them (`geo.allow_demo_databases`), so demo data never
classifies real traffic. An address a database does not know yields None /
no flags (`unknown` to policy), never an error. A replaced file is opened off the event loop
and swapped in; a corrupt or wrong-type replacement is refused and the old reader kept.
Readers serve from a private copy of the file, so a file overwritten in place (rather than
renamed over) can neither crash the process nor corrupt the copy in use.

The request path reads raw records through maxminddb, about twice as fast per lookup as
geoip2's typed reader (docs/architecture.md §9, bench/geo_readers.py). geoip2 serves where
types help: each database is checked at load with a typed lookup of its role, and `explain`
(`gateway geo lookup`, admin explain) answers with geoip2's typed records and
`AddressNotFoundError`.
"""

from __future__ import annotations

import asyncio
import io
import os
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import geoip2.errors
import geoip2.models
import maxminddb

from gateway.log import logger
from gateway.lru import BoundedLRU
from gateway.settings import ConfigError, GeoSettings

# MaxMind field → anonymizer flag name used by policy and logs.
ANONYMIZER_FLAGS = (
    ("is_anonymous_vpn", "vpn"),
    ("is_tor_exit_node", "tor"),
    ("is_public_proxy", "public_proxy"),
    ("is_residential_proxy", "residential_proxy"),
    ("is_hosting_provider", "hosting"),
)
ANONYMIZER_NAMES = frozenset(name for _, name in ANONYMIZER_FLAGS)

#: Per role, the words its database type must hold: `GeoIP2-Country`, `GeoLite2-City`,
#: `GeoLite2-ASN`, `GeoIP2-Anonymous-IP` and the bundled `Demo-*`. (geoip2's own Reader checks
#: exact product names, `GeoLite2-ASN` or `GeoIP2-Anonymous-IP`, and would refuse the demo
#: databases; the role check is therefore the gateway's, the records geoip2's.)
TYPE_WORDS = {"country": ("Country", "City"), "asn": ("ASN",), "anonymous_ip": ("Anonymous-IP",)}


@dataclass(frozen=True, slots=True)
class GeoInfo:
    """What the databases say of one address."""

    country: str | None
    registered_country: str | None
    asn: int | None
    asn_org: str | None
    anonymizer: tuple[str, ...]


UNKNOWN = GeoInfo(None, None, None, None, ())


class GeoDatabaseError(Exception):
    """A database file that cannot be used (missing, corrupt, of the wrong type, or demo data
    where demo data is not allowed); `by_kind` holds the reason per database when several
    were opened at once."""

    def __init__(self, reason: str, by_kind: dict[str, str] | None = None) -> None:
        super().__init__(reason)
        self.by_kind = by_kind or {}


class GeoDatabaseTypeError(GeoDatabaseError):
    """A database whose type does not fit its role (an ASN file given as the country
    database): names the file, the type found and the types the role takes."""

    def __init__(self, kind: str, path: str, found: str) -> None:
        self.kind, self.path, self.found = kind, path, found
        expected = " or ".join(f"*-{word}" for word in TYPE_WORDS[kind])
        super().__init__(f"{path} is a {found!r} database, not a {kind} database "
                         f"(expected a {expected} type)")


#: A typed record of one database (geoip2's models).
TypedRecord = geoip2.models.Country | geoip2.models.ASN | geoip2.models.AnonymousIP


def typed_record(reader: Any, kind: str, database_type: str, ip: str) -> TypedRecord:
    """The record of `ip` in a database of role `kind` as geoip2's model: City (a City
    database) or Country, ASN, AnonymousIP. Raises geoip2.errors.AddressNotFoundError (with
    the prefix length of the empty network) when the database does not know the address,
    ValueError for a malformed address, maxminddb.InvalidDatabaseError for a record that is
    not a map."""
    record, prefix_len = reader.get_with_prefix_len(ip)
    if record is None:
        raise geoip2.errors.AddressNotFoundError(
            f"The address {ip} is not in the database.", ip, prefix_len)
    if not isinstance(record, dict):
        raise maxminddb.InvalidDatabaseError(f"a {type(record).__name__} record, not a map")
    if kind == "country":
        model = geoip2.models.City if "City" in database_type else geoip2.models.Country
        return model(["en"], ip_address=ip, prefix_len=prefix_len, **record)
    flat = geoip2.models.ASN if kind == "asn" else geoip2.models.AnonymousIP
    return flat(ip, prefix_len=prefix_len, **record)


@dataclass(frozen=True, slots=True)
class _Opened:
    path: str
    reader: Any
    database_type: str
    build_epoch: int
    stamp: tuple[int, int, int]


def _stamp(path: str) -> tuple[int, int, int]:
    st = os.stat(path)
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def build_date(epoch: int) -> str:
    """A database build epoch as ISO 8601 (UTC)."""
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds").replace(
        "+00:00", "Z")


def age_days(epoch: int, now: float | None = None) -> float:
    """Days since a database was built, to a tenth of a day."""
    return round(((time.time() if now is None else now) - epoch) / 86400, 1)


def open_database(kind: str, path: str, allow_demo: bool = False) -> _Opened:
    """Open and check one database: its type fits the role `kind` (GeoDatabaseTypeError),
    it is no demo data unless allowed, and a typed lookup decodes. Raise GeoDatabaseError
    with the reason."""
    try:
        stamp = _stamp(path)
        with open(path, "rb") as f:
            data = f.read()
        reader = _private_reader(data)
    except (OSError, ValueError, maxminddb.InvalidDatabaseError) as exc:
        raise GeoDatabaseError(f"cannot open {path}: {exc}") from exc
    try:
        meta = reader.metadata()
        found = str(meta.database_type)
        if not any(word in found for word in TYPE_WORDS[kind]):
            raise GeoDatabaseTypeError(kind, path, found)
        if found.startswith("Demo-") and not allow_demo:
            raise GeoDatabaseError(
                f"{path} is the bundled demo database {found!r}, made-up data: "
                "set geo.allow_demo_databases: true to use it (demo only)")
        try:  # walks the tree once and decodes a record into its typed model
            typed_record(reader, kind, found, "1.1.1.1" if meta.ip_version == 4
                         else "::1.1.1.1")
        except geoip2.errors.AddressNotFoundError:
            pass
    except GeoDatabaseError:
        reader.close()
        raise
    except Exception as exc:  # any decoding fault of a damaged file
        reader.close()
        raise GeoDatabaseError(f"{path} is corrupt: {exc}") from exc
    return _Opened(path, reader, meta.database_type, int(meta.build_epoch), stamp)


def _private_reader(data: bytes) -> Any:
    """A reader over `data` that nothing outside this process can change: with the C extension,
    a mapped temporary file unlinked at once (fast lookups; the mapping keeps it alive), else
    the pure-Python reader over the bytes in memory. Either way the cost is the file's size."""
    if getattr(maxminddb, "extension", None) is not None:
        try:
            fd, tmp = tempfile.mkstemp(prefix="gateway-geo-", suffix=".mmdb")
        except OSError:
            pass  # no writable temporary directory: serve from memory
        else:
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                return maxminddb.open_database(tmp, maxminddb.MODE_MMAP_EXT)
            finally:
                os.unlink(tmp)
    return maxminddb.open_database(io.BytesIO(data), maxminddb.MODE_FD)


def _iso(rec: Any, field: str) -> str | None:
    node = rec.get(field) if isinstance(rec, dict) else None
    code = node.get("iso_code") if isinstance(node, dict) else None
    return code if isinstance(code, str) else None


class GeoResolver:
    """Looks addresses up in up to three databases, with a bounded LRU cache in front."""

    def __init__(self, country_db: str, asn_db: str | None = None,
                 anonymous_ip_db: str | None = None, cache_size: int = 65536,
                 allow_demo: bool = False) -> None:
        self.paths: dict[str, str] = {"country": country_db}
        if asn_db:
            self.paths["asn"] = asn_db
        if anonymous_ip_db:
            self.paths["anonymous_ip"] = anonymous_ip_db
        self.allow_demo = allow_demo
        self.dbs: dict[str, _Opened] = {}
        #: kinds whose file has disappeared (logged once; the copy in service keeps answering)
        self.missing: set[str] = set()
        errors: dict[str, str] = {}
        for kind, path in self.paths.items():
            try:
                self.dbs[kind] = open_database(kind, path, allow_demo)
            except GeoDatabaseError as exc:
                errors[kind] = str(exc)
        if errors:
            self.close()
            raise GeoDatabaseError("; ".join(errors.values()), errors)
        for kind, db in self.dbs.items():
            _log_loaded(kind, db)
        self._cache: BoundedLRU[str, GeoInfo] = BoundedLRU(cache_size)
        self._failing: set[str] = set()  # kinds whose copy in service failed a lookup (logged)
        self.cache_hits = 0
        self.cache_misses = 0

    def build_epochs(self) -> dict[str, int]:
        return {kind: db.build_epoch for kind, db in self.dbs.items()}

    def status(self, max_age_days: float, now: float | None = None) -> dict[str, dict[str, Any]]:
        """Per database: type, build date, age in days, `stale` (older than `max_age_days`) and
        `missing` (its file is gone; the copy in service still answers)."""
        out = {}
        for kind, db in self.dbs.items():
            age = age_days(db.build_epoch, now)
            out[kind] = {"database_type": db.database_type, "build_epoch": db.build_epoch,
                         "build_date": build_date(db.build_epoch), "age_days": age,
                         "stale": age > max_age_days, "missing": kind in self.missing}
        return out

    def lookup(self, ip: str) -> GeoInfo:
        """Everything known of `ip`; never raises for a well-formed or malformed address."""
        cache = self._cache
        hit = cache.get(ip)
        if hit is not None:
            self.cache_hits += 1
            return hit
        self.cache_misses += 1
        info = self._lookup(ip)
        cache.put(ip, info)
        return info

    def peek(self, ip: str) -> GeoInfo:
        """What `lookup` answers, left out of the cache statistics (a second reader of an
        address the request already looked up: reseller screening)."""
        hit = self._cache.get(ip)
        return hit if hit is not None else self._lookup(ip)

    def explain(self, ip: str) -> dict[str, Any]:
        """Per database, for `gateway geo lookup` and explain: its path, type and build, the
        typed record of `ip` (`typed_record`) and the prefix length of its network; `record`
        None when the database does not know the address (the prefix length is then that of
        the empty network) and both None for a malformed address or a damaged record."""
        out: dict[str, Any] = {}
        for kind, db in self.dbs.items():
            rec: TypedRecord | None = None
            prefix: int | None = None
            try:
                rec = typed_record(db.reader, kind, db.database_type, ip)
                network = (rec.traits.network if isinstance(rec, geoip2.models.Country)
                           else rec.network)
                prefix = None if network is None else network.prefixlen
            except geoip2.errors.AddressNotFoundError as exc:
                prefix = None if exc.network is None else exc.network.prefixlen
            except Exception:  # malformed address or damaged record
                rec, prefix = None, None
            out[kind] = {"path": db.path, "database_type": db.database_type,
                         "build_epoch": db.build_epoch, "prefix_len": prefix, "record": rec}
        return out

    def _lookup(self, ip: str) -> GeoInfo:
        rec = self._get("country", ip)
        country = _iso(rec, "country")
        registered = _iso(rec, "registered_country")
        asn = org = None
        arec = self._get("asn", ip)
        if isinstance(arec, dict):
            n = arec.get("autonomous_system_number")
            asn = n if isinstance(n, int) else None
            o = arec.get("autonomous_system_organization")
            org = o if isinstance(o, str) else None
        flags: tuple[str, ...] = ()
        frec = self._get("anonymous_ip", ip)
        if isinstance(frec, dict):
            flags = tuple(name for field, name in ANONYMIZER_FLAGS if frec.get(field) is True)
        return GeoInfo(country or registered, registered, asn, org, flags)

    def _get(self, kind: str, ip: str) -> Any:
        """The record of `ip` in one database; None when the database is absent, does not know
        the address, or fails to decode it (`unknown`, never an error)."""
        db = self.dbs.get(kind)
        if db is None:
            return None
        try:
            return db.reader.get(ip)
        except ValueError:
            return None  # not an IP address
        except Exception as exc:  # a damaged record: unknown, said once per database copy
            if kind not in self._failing:
                self._failing.add(kind)
                logger().error("geo_lookup_failed", database=kind, path=db.path,
                               error=type(exc).__name__)
            return None

    def check_reload(self) -> list[str]:
        """Reopen every database whose file changed on disk; return the kinds swapped in.

        Blocking (file I/O): call through `reload_in_thread` from the event loop."""
        swapped: list[str] = []
        for kind, path in self.paths.items():
            old = self.dbs[kind]
            try:
                stamp = _stamp(path)
            except OSError as exc:
                # geoipupdate renames into place, so the path never lacks a file; a file gone
                # is a mistake to show (once), while the copy in service keeps answering.
                if kind not in self.missing:
                    self.missing.add(kind)
                    logger().error("geo_database_missing", database=kind, path=path,
                                   reason=exc.strerror or str(exc),
                                   build_epoch=old.build_epoch)
                continue
            if kind in self.missing:
                self.missing.discard(kind)
                old = self.dbs[kind] = _Opened(old.path, old.reader, old.database_type,
                                               old.build_epoch, (-1, -1, -1))
            if stamp == old.stamp:
                continue
            try:
                new = open_database(kind, path, self.allow_demo)
            except GeoDatabaseError as exc:
                # Refuse the file, keep the old reader; remember the stamp to log once.
                self.dbs[kind] = _Opened(old.path, old.reader, old.database_type,
                                         old.build_epoch, _stamp_or(path, old.stamp))
                logger().error("geo_database_rejected", database=kind, path=path,
                               reason=str(exc), build_epoch=old.build_epoch)
                continue
            self.dbs[kind] = new
            self._failing.discard(kind)
            swapped.append(kind)
            _log_loaded(kind, new)
        if swapped:
            # a fresh cache: lookups in flight keep the old one
            self._cache = BoundedLRU(self._cache.maxsize)
        return swapped

    async def reload_in_thread(self) -> list[str]:
        return await asyncio.to_thread(self.check_reload)

    def close(self) -> None:
        for db in self.dbs.values():
            db.reader.close()


_FIELDS = {"country": "geo.country_db", "asn": "geo.asn_db", "anonymous_ip": "geo.anonymous_ip_db"}


def open_geo(geo: GeoSettings, config_path: str, cache_size: int | None = None) -> GeoResolver:
    """The resolver a config asks for; ConfigError naming every database that cannot be used
    (`geo.country_db: ...`), one problem each."""
    try:
        return GeoResolver(geo.country_db, geo.asn_db, geo.anonymous_ip_db,
                           geo.cache_size if cache_size is None else cache_size,
                           geo.allow_demo_databases)
    except GeoDatabaseError as exc:
        raise ConfigError.of([ConfigError(config_path, _FIELDS[kind], reason)
                              for kind, reason in exc.by_kind.items()]) from None


def _stamp_or(path: str, default: tuple[int, int, int]) -> tuple[int, int, int]:
    try:
        return _stamp(path)
    except OSError:
        return default


def _log_loaded(kind: str, db: _Opened) -> None:
    logger().info("geo_database_loaded", database=kind, path=db.path,
                  database_type=db.database_type, build_epoch=db.build_epoch,
                  build_date=build_date(db.build_epoch), age_days=age_days(db.build_epoch))
