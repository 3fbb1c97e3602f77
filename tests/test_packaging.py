"""Packaging: the wheel holds the gateway only, the tools' extras and what a tool says without
its extra, the container image and its lock files."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from tests.support.cli import cli_env

REPO = Path(__file__).resolve().parents[1]


def _without(modules: tuple[str, ...], *argv: str) -> subprocess.CompletedProcess[str]:
    """`python -m tools <argv>` in a fresh interpreter where `modules` cannot be imported, as
    when the extra that installs them is missing (a None entry in sys.modules blocks an
    import)."""
    code = ("import sys\n"
            f"for name in {modules!r}: sys.modules[name] = None\n"
            "from tools.__main__ import main\n"
            f"sys.exit(main({list(argv)!r}))\n")
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=cli_env(),
                          capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.parametrize(("blocked", "argv", "extra"), [
    (("anthropic",), ("demo",), "demo"),
    (("mmdb_writer",), ("geo-build",), "geo-build"),
    (("netaddr",), ("geo-build",), "geo-build"),
])
def test_a_tool_without_its_extra_names_the_extra_and_exits_2(
    blocked: tuple[str, ...], argv: tuple[str, ...], extra: str, tmp_path: Path
) -> None:
    """`python -m tools demo` / `python -m tools geo-build` without their extra print one line
    naming the extra to install and exit 2, having started and written nothing."""
    out = tmp_path / "geo-out"
    args = (*argv, "--out", str(out)) if argv[0] == "geo-build" else argv
    done = _without(blocked, *args)
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: ")
    assert f"[{extra}]" in lines[0] and blocked[0] in lines[0]
    assert "Traceback" not in done.stderr
    assert not out.exists()


def test_geo_build_with_its_extra_still_builds(tmp_path: Path) -> None:
    """With the geo-build extra installed, `python -m tools geo-build` writes the three
    databases."""
    done = _without((), "geo-build", "--src", str(REPO / "geo" / "demo" / "src"),
                    "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in tmp_path.glob("*.mmdb")) == [
        "Demo-ASN.mmdb", "Demo-Anonymous-IP.mmdb", "Demo-Country.mmdb"]


def test_geo_build_of_a_bad_source_is_one_error_line(tmp_path: Path) -> None:
    """A malformed source makes `python -m tools geo-build` print one `error:` line naming the
    file and exit 2, writing nothing."""
    src = tmp_path / "src"
    shutil.copytree(REPO / "geo" / "demo" / "src", src)
    (src / "Demo-ASN.json").write_text("{", encoding="utf-8")
    out = tmp_path / "out"
    done = _without((), "geo-build", "--src", str(src), "--out", str(out))
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error: Demo-ASN.json: not valid JSON")
    assert len(done.stderr.splitlines()) == 1 and "Traceback" not in done.stderr
    assert not list(out.glob("*.mmdb"))


@pytest.mark.parametrize(("argv", "where"), [
    (("demo",), "make demo"),
    (("geo", "build", "--src", "geo/demo/src"), "make geo"),
])
def test_a_command_that_moved_to_tools_says_where_it_went(
        argv: tuple[str, ...], where: str) -> None:
    """`gateway demo` and `gateway geo build` left the package: each prints one `error:` line
    naming the make target that replaces it and exits 2, instead of argparse's invalid
    choice."""
    done = subprocess.run([sys.executable, "-m", "gateway", *argv], cwd=REPO, env=cli_env(),
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    assert done.stderr.startswith("error: gateway ") and where in done.stderr, done.stderr
    assert len(done.stderr.splitlines()) == 1 and "invalid choice" not in done.stderr


# --- the wheel --------------------------------------------------------------------------------

def test_the_wheel_holds_the_gateway_only(tmp_path: Path) -> None:
    """The built wheel holds gateway/ (with its Lua scripts, py.typed and the screening page's
    files) and its metadata, nothing else: no tools/, no tests/, no stand-in upstream, demo or
    geo builder."""
    # From a copy of the tree as git holds it: a build writes build/ beside the sources, and a
    # stale build/ in the checkout could both hide and add files.
    src, out = tmp_path / "src", tmp_path / "dist"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "*.egg-info", "__pycache__", ".*_cache", ".hypothesis",
        "results"))
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet",
                           "--wheel-dir", str(out), str(src)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    (wheel,) = out.glob("gateway-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        doubles = [n for n in names if n.endswith(".py") and b"FakeUpstream" in zf.read(n)]
    tops = {n.split("/", 1)[0] for n in names}
    assert tops == {"gateway", "gateway-0.1.0.dist-info"}, tops
    assert {"gateway/cli.py", "gateway/geo.py", "gateway/py.typed",
            "gateway/store/lua/admit.lua", "gateway/ui/index.html", "gateway/ui/app.js",
            "gateway/ui/app.css", "gateway/ui/favicon.svg"} <= set(names)
    modules = {Path(n).stem for n in names if n.endswith(".py")}
    assert not modules & {"standin", "demo", "geo_build", "upstream", "conftest"}, modules
    assert doubles == []  # no module of the wheel defines or uses the stand-in upstream


# --- the container image ---------------------------------------------------------------------

def _stages() -> dict[str, list[str]]:
    """The Dockerfile's instructions (continuation lines joined) by stage name, in order; the
    ARGs before the first FROM under ""."""
    text = (REPO / "Dockerfile").read_text(encoding="utf-8").replace("\\\n", " ")
    stages: dict[str, list[str]] = {"": []}
    current = ""
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            words = line.split()
            current = words[3] if len(words) > 3 and words[2].upper() == "AS" else "(final)"
            stages[current] = [line]
        else:
            stages[current].append(line)
    return stages


def _copies(instructions: list[str]) -> list[list[str]]:
    """The source paths of each COPY (flags dropped; --from copies have none from the context)."""
    out = []
    for ins in instructions:
        words = ins.split()
        if words[0].upper() != "COPY" or any(w.startswith("--from") for w in words):
            continue
        out.append([w for w in words[1:-1] if not w.startswith("--")])
    return out


def test_dockerfile_installs_the_lock_before_the_source_is_copied() -> None:
    """The dependency layer (lock copied, installed with --require-hashes) comes before any
    source is copied, and the package itself is installed with --no-deps."""
    build = _stages()["build"]
    kinds = []
    for ins in build:
        if ins.upper().startswith("COPY"):
            srcs = _copies([ins])[0]
            kinds.append("lock" if all(s.startswith("requirements") and s.endswith(".lock")
                                       for s in srcs) else "source")
        elif ins.upper().startswith("RUN") and "pip install" in ins:
            if "--require-hashes" in ins:
                assert "requirements" in ins
                kinds.append("deps")
            else:
                assert "--no-deps" in ins, ins
                kinds.append("package")
    assert kinds == ["lock", "deps", "source", "source", "package"], kinds


def test_dockerfile_holds_no_demo_data_or_config_unless_built_for_the_demo() -> None:
    """Only the stage chosen by --build-arg DEMO=1 copies geo data or a config; by default the
    final image is the production stage, which copies nothing into /etc/gateway."""
    stages = _stages()
    assert "ARG DEMO=0" in stages[""]
    assert stages["(final)"] == ["FROM image-${DEMO}"]
    assert set(stages) >= {"build", "image-0", "image-1"}
    for name, instructions in stages.items():
        demo_files = [s for srcs in _copies(instructions) for s in srcs
                      if s.startswith(("geo", "config", "deploy", "tests"))]
        if name == "image-1":
            assert any(s.startswith("geo/demo") for s in demo_files)
        else:
            assert not demo_files, (name, demo_files)
            assert not any("/etc/gateway" in i for i in instructions if i.startswith("COPY"))
    assert stages["image-1"][0].startswith("FROM image-0")


def _pins(lock: str) -> dict[str, str]:
    """name → version of every requirement in a lock file, each checked to carry hashes."""
    text = (REPO / lock).read_text(encoding="utf-8").replace("\\\n", " ")
    pins = {}
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        req = line.split()[0]
        name, sep, version = req.partition("==")
        assert sep and "--hash=sha256:" in line, line[:120]
        pins[name.lower().replace("_", "-")] = version
    return pins


def test_lock_files_pin_every_dependency_with_hashes() -> None:
    """requirements.lock pins every runtime dependency with hashes; requirements-demo.lock adds
    the demo and geo-build extras at the same versions."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]

    def names(reqs: list[str]) -> set[str]:
        return {re.split(r"[<>=\[; ]", r, maxsplit=1)[0].lower() for r in reqs}

    runtime, demo = _pins("requirements.lock"), _pins("requirements-demo.lock")
    assert names(project["dependencies"]) <= set(runtime)
    extras = project["optional-dependencies"]
    assert names(extras["demo"]) | names(extras["geo-build"]) <= set(demo)
    assert not names(extras["demo"]) & set(runtime)
    assert {"setuptools", "wheel"} <= set(runtime)  # the package is built from the lock too
    assert {n: v for n, v in demo.items() if n in runtime} == runtime
