"""bench/redis_monitor.py: MONITOR lines attributed to the requests' limit scripts or to the
background, on canned lines of redis-server 7's format and on a real redis-server."""

from __future__ import annotations

import hashlib

import redis.asyncio

from bench.redis_monitor import Classified, Monitor, script_names
from tests.support.redis_server import RedisServer


def _sha(name: str) -> str:
    return next(sha for sha, n in script_names().items() if n == name)


def _feed(lines: list[str]) -> Classified:
    out, state, names = Classified(), [], script_names()
    for line in lines:
        out.feed(line, names, state)
    return out


def test_script_lines_follow_their_evalsha() -> None:
    """A script's "lua" lines count with its EVALSHA: the admission's as the request's, the
    usage flush's HMGET/HSET as background though the limit scripts run the same commands."""
    admit, usage = _sha("admit.lua"), _sha("add_usage.lua")
    seen = _feed([
        f'+1796183778.074517 [0 127.0.0.1:47156] "EVALSHA" "{admit}" "3" "gw:{{r:a}}:key:k"',
        '+1796183778.074570 [0 lua] "TIME"',
        '+1796183778.074581 [0 lua] "HMGET" "gw:{r:a}:key:k" "t"',
        '+1796183778.074590 [0 lua] "HSET" "gw:{r:a}:key:k" "t" "1"',
        f'+1796183778.075000 [0 127.0.0.1:47160] "evalsha" "{usage}" "1" "gw:{{r:a}}:usage"',
        '+1796183778.075010 [0 lua] "HMGET" "gw:{r:a}:usage" "c"',
        '+1796183778.075020 [0 lua] "HSET" "gw:{r:a}:usage" "c" "2"',
        '+1796183778.076000 [0 127.0.0.1:47160] "SADD" "gw:{usage}:resellers:d" "a"',
        '+1796183778.076100 [0 127.0.0.1:47170] "info" "commandstats"',
        '+1796183778.076200 [0 127.0.0.1:47171] "HELLO" "3"',
    ])
    assert seen.request_calls == {"admit.lua": 1}
    assert seen.request_internal == {"time": 1, "hmget": 1, "hset": 1}
    assert seen.background == {"evalsha:add_usage.lua": 1, "hmget": 1, "hset": 1, "sadd": 1}
    assert seen.connection_setup == 1 and seen.unattributed == 0


def test_a_plain_command_ends_a_script() -> None:
    """Lines of a script that no EVALSHA opened are counted as unattributed, not guessed."""
    seen = _feed(['+1.0 [0 lua] "HSET" "k" "f" "v"',
                  '+1.1 [0 127.0.0.1:1] "GET" "k"'])
    assert seen.unattributed == 1 and seen.background == {"get": 1}


async def test_monitor_reads_until_its_marker(redis_server: RedisServer) -> None:
    """On a real redis-server, every command sent before the window closes is counted; an
    unknown script and what it runs are background."""
    script = "redis.call('HSET', KEYS[1], 'f', 'v'); return redis.call('TIME')"
    client = redis.asyncio.Redis.from_url(redis_server.url)
    try:
        async with Monitor(redis_server.port) as seen:
            sha = await client.script_load(script)
            assert sha == hashlib.sha1(script.encode()).hexdigest()
            for _ in range(50):
                await client.evalsha(sha, 1, "bench-test:k")
            await client.set("bench-test:plain", "1")
    finally:
        await client.aclose()
    assert seen.request_calls == {}
    assert seen.background["evalsha:?"] == 50
    assert seen.background["hset"] == 50 and seen.background["time"] == 50
    assert seen.background["set"] == 1
