"""Geo lookups: country, ASN and anonymizer flags from MaxMind databases, cached and hot-reloaded.

Only the country database is required. An address a database does not know yields None /
no flags (`unknown` to policy), never an error. A replaced file is opened off the event loop
and swapped in; a corrupt or wrong-type replacement is refused and the old reader kept.
Readers serve from a private copy of the file, so a file overwritten in place (rather than
renamed over) can neither crash the process nor corrupt the copy in use.
"""

from __future__ import annotations

import asyncio
import io
import os
import tempfile
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import maxminddb

from gateway.audit import logger

# MaxMind field → anonymizer flag name used by policy and logs.
ANONYMIZER_FLAGS = (
    ("is_anonymous_vpn", "vpn"),
    ("is_tor_exit_node", "tor"),
    ("is_public_proxy", "public_proxy"),
    ("is_residential_proxy", "residential_proxy"),
    ("is_hosting_provider", "hosting"),
)
ANONYMIZER_NAMES = frozenset(name for _, name in ANONYMIZER_FLAGS)

_KINDS = {"country": ("Country", "City"), "asn": ("ASN",), "anonymous_ip": ("Anonymous-IP",)}


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
    """A database file that cannot be used (missing, corrupt or of the wrong type)."""


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


def open_database(kind: str, path: str) -> _Opened:
    """Open and check one database; raise GeoDatabaseError with the reason."""
    try:
        stamp = _stamp(path)
        with open(path, "rb") as f:
            data = f.read()
        reader = _private_reader(data)
    except (OSError, ValueError, maxminddb.InvalidDatabaseError) as exc:
        raise GeoDatabaseError(f"cannot open {path}: {exc}") from exc
    try:
        meta = reader.metadata()
        if not any(word in meta.database_type for word in _KINDS[kind]):
            raise GeoDatabaseError(
                f"{path} is a {meta.database_type!r} database, not a {kind} database")
        reader.get("1.1.1.1" if meta.ip_version == 4 else "::1.1.1.1")  # walks the tree once
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
                 anonymous_ip_db: str | None = None, cache_size: int = 65536) -> None:
        self.paths: dict[str, str] = {"country": country_db}
        if asn_db:
            self.paths["asn"] = asn_db
        if anonymous_ip_db:
            self.paths["anonymous_ip"] = anonymous_ip_db
        self.dbs: dict[str, _Opened] = {}
        for kind, path in self.paths.items():
            self.dbs[kind] = open_database(kind, path)
            _log_loaded(kind, self.dbs[kind])
        self._cache: OrderedDict[str, GeoInfo] = OrderedDict()
        self._cache_size = cache_size
        self._failing: set[str] = set()  # kinds whose copy in service failed a lookup (logged)
        self.cache_hits = 0
        self.cache_misses = 0

    def build_epochs(self) -> dict[str, int]:
        return {kind: db.build_epoch for kind, db in self.dbs.items()}

    def lookup(self, ip: str) -> GeoInfo:
        """Everything known of `ip`; never raises for a well-formed or malformed address."""
        cache = self._cache
        hit = cache.get(ip)
        if hit is not None:
            self.cache_hits += 1
            cache.move_to_end(ip)
            return hit
        self.cache_misses += 1
        info = self._lookup(ip)
        if self._cache_size:
            cache[ip] = info
            if len(cache) > self._cache_size:
                cache.popitem(last=False)
        return info

    def explain(self, ip: str) -> dict[str, Any]:
        """Raw records per database, for `gateway geo lookup` and explain."""
        out: dict[str, Any] = {}
        for kind, db in self.dbs.items():
            try:
                rec, prefix = db.reader.get_with_prefix_len(ip)
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
                if _stamp(path) == old.stamp:
                    continue
            except OSError:
                continue  # mid-replace (geoipupdate renames into place); try next time
            try:
                new = open_database(kind, path)
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
            self._cache = OrderedDict()  # a fresh dict: lookups in flight keep the old one
        return swapped

    async def reload_in_thread(self) -> list[str]:
        return await asyncio.to_thread(self.check_reload)

    def close(self) -> None:
        for db in self.dbs.values():
            db.reader.close()


def _stamp_or(path: str, default: tuple[int, int, int]) -> tuple[int, int, int]:
    try:
        return _stamp(path)
    except OSError:
        return default


def _log_loaded(kind: str, db: _Opened) -> None:
    logger().info("geo_database_loaded", database=kind, path=db.path,
                  database_type=db.database_type, build_epoch=db.build_epoch)
