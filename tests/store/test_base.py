"""Unit tests for gateway.store.base: the stored key record and the GCRA cost rule."""

from __future__ import annotations

import json

from gateway.errors import StoreError
from gateway.store.base import KeyRecord, StoreCallNotSent, gcra_cost


def _rec() -> KeyRecord:
    return KeyRecord(key_id="k1", reseller="acme", secret_hash="h" * 64, name="n",
                     models=["claude-*"], limits={"rpm": 5}, prev_secret_hash="p" * 64,
                     prev_valid_until=10.0)


def test_key_record_round_trips_through_json() -> None:
    """to_json and from_json give back an equal record, from str or bytes."""
    rec = _rec()
    text = rec.to_json()
    assert KeyRecord.from_json(text) == rec
    assert KeyRecord.from_json(text.encode()) == rec


def test_key_record_json_is_canonical() -> None:
    """The JSON form is compact with sorted keys, so equal records store equal bytes."""
    text = _rec().to_json()
    assert " " not in text
    assert list(json.loads(text)) == sorted(json.loads(text))


def test_public_view_holds_no_hash() -> None:
    """public() drops both secret hashes and keeps everything an operator needs."""
    pub = _rec().public()
    assert "secret_hash" not in pub and "prev_secret_hash" not in pub
    assert "h" * 64 not in json.dumps(pub) and "p" * 64 not in json.dumps(pub)
    assert pub["key_id"] == "k1" and pub["prev_valid_until"] == 10.0
    assert pub["status"] == "active"


def test_gcra_cost_is_capped_at_the_whole_bucket() -> None:
    """A request costs its tokens, or the whole bucket when it is larger than the bucket."""
    assert gcra_cost(100, 30) == 30
    assert gcra_cost(100, 100) == 100
    assert gcra_cost(100, 5000) == 100


def test_a_call_not_sent_is_a_store_error() -> None:
    """StoreCallNotSent is caught wherever a StoreError is."""
    assert issubclass(StoreCallNotSent, StoreError)


def test_key_record_quotas_round_trip_and_old_records_still_load() -> None:
    """A key's quotas survive the JSON form; a record stored before quotas existed loads with
    none."""
    rec = _rec()
    rec.quotas = {"daily.output_tokens": 500}
    assert KeyRecord.from_json(rec.to_json()).quotas == {"daily.output_tokens": 500}
    old = json.loads(_rec().to_json())
    del old["quotas"]
    assert KeyRecord.from_json(json.dumps(old)).quotas == {}
