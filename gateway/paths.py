"""Request paths as the upstream will see them (docs/architecture.md §4): the request target
normalised once, and segment-aware path globs matched against that normalised path.

Both are pure: `normalize_target` and `compile_path_globs` raise ValueError (with a reason that
never repeats client input) and nothing else.
"""

from __future__ import annotations

import re

# A target made only of these characters, with no "//" and no "/." in it, is already normal.
_PLAIN = re.compile(r"/[A-Za-z0-9/_.~-]*")
# RFC 3986 pchar and "/" (pct-encoded checked separately); anything else in a path is refused.
_PATH_CHARS = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=:@%/]*")
# The query is forwarded as received: printable ASCII except '#' (a fragment is never sent).
_QUERY_CHARS = re.compile(r"[!-\"$-~]*")
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_REFUSED_ESCAPES = {0x2F: "an encoded '/' (%2F)", 0x5C: "an encoded '\\' (%5C)",
                    0x00: "an encoded NUL (%00)"}


def _decode(m: re.Match[str]) -> str:
    value = int(m.group(1), 16)
    refused = _REFUSED_ESCAPES.get(value)
    if refused is not None:
        raise ValueError(f"the path holds {refused}")
    ch = chr(value)
    return ch if ch in _UNRESERVED else "%" + m.group(1).upper()


def _path_fault(path: str) -> str:
    if "\\" in path:
        return "the path holds a '\\'"
    if "\x00" in path:
        return "the path holds a NUL"
    return "the path holds a character that must be percent-encoded"


def normalize_target(raw: str) -> tuple[str, str]:
    """(normalised path, raw query without '?') of an origin-form request target.

    Slashes are merged first (as nginx does), then per RFC 3986: escapes of unreserved
    characters decoded, other escapes kept with upper-case hex, `.`/`..` segments removed.
    ValueError for every target that is not unambiguous: absolute-form, authority-form and `*`;
    a fragment; characters outside RFC 3986 (space, controls, non-ASCII, `\\`); a malformed
    escape; `%2F`, `%5C`, `%00`; an encoded dot segment (`%2e`, `.%2E`); a dot segment with
    parameters (`..;x`); a `..` that climbs above the root.
    """
    path, qmark, query = raw.partition("?")
    if qmark and not _QUERY_CHARS.fullmatch(query):
        raise ValueError("the query holds a character that must be percent-encoded")
    if _PLAIN.fullmatch(path) and "//" not in path and "/." not in path:
        return path, query
    if not path.startswith("/"):
        raise ValueError("the request target must be a path starting with '/' "
                         "(absolute-form, authority-form and '*' are refused)")
    if not _PATH_CHARS.fullmatch(path):
        raise ValueError(_path_fault(path))
    if _BAD_ESCAPE.search(path):
        raise ValueError("the path holds a malformed percent-escape")
    segments = path[1:].split("/")
    last = len(segments) - 1
    out: list[str] = []
    for i, seg in enumerate(segments):
        if not seg and i != last:
            continue  # merged slashes
        if "%" in seg:
            decoded = _ESCAPE.sub(_decode, seg)
            if decoded in (".", "..") or decoded.partition(";")[0] in (".", ".."):
                raise ValueError("the path holds an encoded dot segment")
            seg = decoded
        elif ";" in seg and seg.partition(";")[0] in (".", ".."):
            raise ValueError("the path holds a dot segment with parameters")
        if seg == ".":
            if i == last:
                out.append("")
            continue
        if seg == "..":
            if not out:
                raise ValueError("the path climbs above the root with '..'")
            out.pop()
            if i == last:
                out.append("")
            continue
        out.append(seg)
    return "/" + "/".join(out), query


# --- path globs ------------------------------------------------------------------------------

_GLOB_ESCAPE = re.compile(r"%([0-9A-F]{2})")


def _char_class(seg: str, i: int) -> tuple[str, int]:
    """The regex of the `[...]` class starting at seg[i], and the index after it."""
    j = i + 1
    negate = j < len(seg) and seg[j] == "!"
    if negate:
        j += 1
    start = j
    if j < len(seg) and seg[j] == "]":
        j += 1  # a ']' first in the class is a member, as in fnmatch
    end = seg.find("]", j)
    if end < 0:
        raise ValueError("unbalanced '[' in a path glob")
    body = seg[start:end]
    items: list[str] = []
    k = 0
    while k < len(body):
        a = body[k]
        if k + 2 < len(body) and body[k + 1] == "-":
            b = body[k + 2]
            if a > b:
                raise ValueError(f"reversed range {a}-{b} in a path glob")
            items.append(f"{re.escape(a)}-{re.escape(b)}")
            k += 3
        else:
            items.append(re.escape(a))
            k += 1
    # A class never matches '/': the segment boundary is not the class's to cross.
    return ("[^/" + "".join(items) + "]" if negate else "(?!/)[" + "".join(items) + "]"), end + 1


def _segment(seg: str) -> str:
    """The regex of one glob segment: `*` any run of non-'/' characters, `?` one, `[...]`."""
    chunks: list[list[str]] = [[]]
    i = 0
    while i < len(seg):
        c = seg[i]
        if c == "*":
            chunks.append([])
            i += 1
        elif c == "?":
            chunks[-1].append("[^/]")
            i += 1
        elif c == "[":
            cls, i = _char_class(seg, i)
            chunks[-1].append(cls)
        else:
            chunks[-1].append(re.escape(c))
            i += 1
    if len(chunks) == 1:
        return "".join(chunks[0])
    # Between stars, the earliest match of each fixed chunk is always good enough, so it is
    # taken atomically: no backtracking, linear in the segment (as fnmatch does since 3.9).
    mids = "".join(f"(?>[^/]*?{''.join(c)})" for c in chunks[1:-1])
    return "".join(chunks[0]) + mids + "[^/]*" + "".join(chunks[-1])


def _check_glob_text(pattern: str) -> None:
    if not pattern.startswith("/"):
        raise ValueError("a path glob starts with '/' (use '/**' for every path)")
    if len(pattern) > 1024:
        raise ValueError("a path glob is at most 1024 characters")
    if not _PATH_CHARS.fullmatch(pattern.replace("*", "").replace("?", "")
                                 .replace("[", "").replace("]", "")):
        raise ValueError("a path glob holds a character a normalised path never has")
    if _BAD_ESCAPE.search(pattern) or re.search(r"%[0-9A-F]?[a-f]", pattern):
        raise ValueError("a percent-escape in a path glob is '%' and two upper-case hex digits")
    for m in _GLOB_ESCAPE.finditer(pattern):
        value = int(m.group(1), 16)
        if value in _REFUSED_ESCAPES or chr(value) in _UNRESERVED:
            raise ValueError(f"'%{m.group(1)}' never appears in a normalised path")


def translate_path_glob(pattern: str) -> str:
    """The regex (for fullmatch) of one segment-aware path glob; ValueError when invalid.

    `*` matches within one segment, `?` one character of a segment, `[...]`/`[!...]` a class
    (never '/'); `**` as a whole segment matches zero or more segments, so `/v1/messages/**`
    matches `/v1/messages`, `/v1/messages/` and everything below it. Globs are written as
    normalised paths: no `//`, `.`/`..` segments, `\\`, or escapes of unreserved characters.
    """
    _check_glob_text(pattern)
    segments = pattern[1:].split("/")
    pieces: list[list[str]] = [[]]  # runs of segments separated by '**'
    for i, seg in enumerate(segments):
        if seg == "**":
            if not pieces[-1] and len(pieces) > 1:
                continue  # '**/**' is one '**'
            pieces.append([])
        elif "**" in seg:
            raise ValueError("'**' must be a whole path segment ('/a/**', not '/a**')")
        elif not seg and i != len(segments) - 1:
            raise ValueError("a path glob has no empty segment ('//')")
        elif seg in (".", ".."):
            raise ValueError("a path glob has no '.' or '..' segment")
        else:
            pieces[-1].append(_segment(seg))

    def run(segs: list[str]) -> str:
        return "".join("/" + s for s in segs)

    out = run(pieces[0])
    if len(pieces) == 1:
        return out
    # A '**' followed by more '**' takes the earliest place its segments match (atomically,
    # like the stars of a segment); the last run is anchored at the end.
    for mid in pieces[1:-1]:
        out += f"(?>(?:/.*?)??{run(mid)}(?=/|\\Z))"
    return out + "(?:/.*)?" + run(pieces[-1])


class PathGlobs:
    """Compiled path globs; `match(path)` is True when any of them matches the whole path."""

    __slots__ = ("_re", "patterns")

    def __init__(self, patterns: list[str]) -> None:
        self.patterns = tuple(patterns)
        self._re = re.compile("|".join(f"(?:{translate_path_glob(p)})" for p in patterns),
                              re.DOTALL)

    def match(self, path: str) -> bool:
        return self._re.fullmatch(path) is not None


def compile_path_globs(patterns: list[str] | None) -> PathGlobs | None:
    """PathGlobs for a non-empty list (None = no path scope); ValueError for an invalid glob."""
    if not patterns:
        return None
    return PathGlobs(patterns)
