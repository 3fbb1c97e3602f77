"""`gateway run` refusing to start: one line per problem on stderr and exit 2, never a
traceback (a port in use, with or without workers; a policy rule on a database the config lacks,
at run and at policy apply), and the one-line warning for a trust-everyone proxy list."""

from __future__ import annotations

import asyncio
import socket
import sys
from pathlib import Path

from tests.support.cli import cli_env
from tests.support.gateway import running_gateway, write_config
from tests.support.redis_server import RedisServer, free_port
from tests.support.upstream import FakeUpstream

BAD = Path(__file__).resolve().parents[1] / "fixtures" / "bad_config"


async def _run(config: Path, cwd: Path) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "run", "--config", str(config), cwd=cwd,
        env=cli_env(), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    async with asyncio.timeout(60):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_port_in_use_is_one_line_and_exit_2(tmp_path: Path, upstream: FakeUpstream
                                                  ) -> None:
    """A listen or admin_listen port another socket holds: one `error:` line naming the field
    and the address, exit 2, no traceback."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        busy = held.getsockname()[1]
        for field, other in (("listen", "admin_listen"), ("admin_listen", "listen")):
            cfg = write_config(tmp_path, upstream.url, **{
                field: f"127.0.0.1:{busy}", other: f"127.0.0.1:{free_port()}"})
            code, _, err = await _run(cfg, tmp_path)
            assert code == 2, err
            assert err == f"error: {field} 127.0.0.1:{busy}: address already in use\n"


async def test_run_refuses_a_policy_rule_on_a_missing_database(tmp_path: Path) -> None:
    """`gateway run` names every rule of the policy file that needs a database the config does
    not set, one line each, and exits 2 before it listens."""
    code, out, err = await _run(BAD / "rule_needs_database.yaml", tmp_path)
    assert code == 2 and out == ""
    policy = BAD / "policies" / "needs_databases.yaml"
    assert err.splitlines() == [
        f"error: {policy}: rules[anonymizers].match.anonymizer: needs geo.anonymous_ip_db, "
        "which the gateway config does not set",
        f"error: {policy}: rules[bad-network].match.asn: needs geo.asn_db, which the gateway "
        "config does not set",
    ]


async def test_trust_everyone_warns_at_start(tmp_path: Path, upstream: FakeUpstream) -> None:
    """A gateway trusting 0.0.0.0/0 starts, and logs one config_warning line saying so."""
    async with running_gateway(tmp_path, upstream.url,
                               client_ip={"trusted_proxies": ["0.0.0.0/0"]}) as gw:
        [warning] = gw.logs.events("config_warning")
        assert warning["level"] == "warning"
        assert warning["warning"].endswith(
            "client_ip.trusted_proxies: 0.0.0.0/0 trusts every peer: any client can choose "
            "the address it is located and limited by (X-Forwarded-For)")
        status, _ = await gw.admin("GET", "/readyz")
        assert status == 200


async def test_port_in_use_with_workers_exits_2(tmp_path: Path, upstream: FakeUpstream,
                                                redis_server: RedisServer) -> None:
    """With --workers, a worker that cannot bind stops the whole gateway with exit 2 rather
    than being restarted in a loop."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        busy = held.getsockname()[1]
        cfg = write_config(tmp_path, upstream.url, listen=f"127.0.0.1:{busy}",
                           admin_listen=f"127.0.0.1:{free_port()}",
                           store={"url": redis_server.url})
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "run", "--workers", "2", "--config", str(cfg),
            cwd=tmp_path, env=cli_env(), stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        async with asyncio.timeout(60):
            _, err = await proc.communicate()
    assert proc.returncode == 2
    lines = set(err.decode().splitlines())
    assert lines == {f"error: listen 127.0.0.1:{busy}: address already in use"}


async def test_policy_apply_refuses_a_rule_on_a_missing_database(tmp_path: Path) -> None:
    """`gateway policy apply` (dry run or not) refuses a policy whose rules need a database the
    config lacks, naming each rule, before it reaches any store."""
    policy = BAD / "policies" / "needs_databases.yaml"
    for extra in (["--dry-run"], []):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "policy", "apply", str(policy), *extra,
            "--config", str(BAD / "rule_needs_database.yaml"), cwd=tmp_path, env=cli_env(),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        async with asyncio.timeout(60):
            out, err = await proc.communicate()
        assert proc.returncode == 2 and out == b""
        assert [line.split(": ", 2)[2] for line in err.decode().splitlines()] == [
            "rules[anonymizers].match.anonymizer: needs geo.anonymous_ip_db, which the gateway "
            "config does not set",
            "rules[bad-network].match.asn: needs geo.asn_db, which the gateway config does not "
            "set"]
