"""Every Redis key a Lua script touches comes from ``contracts.Keys`` through KEYS/ARGV
(docs/architecture.md): no script names a key itself, which is also what Redis Cluster requires.

The check reads every ``daemon/stores/lua/*.lua`` and fails on a string literal (outside
comments) that holds the daemon's key namespace.
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

import pytest

from daemon.contracts import Keys

LUA = Path(str(resources.files("daemon.stores") / "lua"))


def _namespaces() -> set[str]:
    """The first segment ("tts:") of every key name and prefix ``Keys`` defines."""
    names = [v for k, v in vars(Keys).items() if k.isupper() and isinstance(v, str)]
    return {n.split(":", 1)[0] + ":" for n in names if ":" in n}


def string_literals(src: str) -> list[tuple[int, str]]:
    """(line, text) of each string literal in Lua source, comments skipped."""
    out: list[tuple[int, str]] = []
    i, line, n = 0, 1, len(src)
    while i < n:
        c = src[i]
        if c == "\n":
            line += 1
            i += 1
        elif src.startswith("--", i):
            long = re.match(r"--\[(=*)\[", src[i:])
            end = src.find("]" + long.group(1) + "]", i) if long else src.find("\n", i)
            end = n if end < 0 else end
            line += src.count("\n", i, end)
            i = end
        elif c in "'\"":
            j = i + 1
            while j < n and src[j] != c:
                j += 2 if src[j] == "\\" else 1
            out.append((line, src[i + 1 : j]))
            line += src.count("\n", i, j)
            i = j + 1
        elif long := re.match(r"\[(=*)\[", src[i:]):
            end = src.find("]" + long.group(1) + "]", i)
            end = n if end < 0 else end
            out.append((line, src[i + len(long.group(0)) : end]))
            line += src.count("\n", i, end)
            i = end + len(long.group(0))
        else:
            i += 1
    return out


def test_the_scanner_finds_literals_and_skips_comments() -> None:
    src = (
        "-- 'tts:a'\nlocal x = 'tts:b' .. y -- \"tts:c\"\n"
        'local z = "q\\"tts:d" --[[ \'tts:e\'\n]] w = [[tts:f]]\n'
    )
    found = [t for _, t in string_literals(src) if "tts:" in t]
    assert found == ["tts:b", 'q\\"tts:d', "tts:f"]


def test_namespaces_come_from_keys() -> None:
    assert "tts:" in _namespaces()


@pytest.mark.parametrize("path", sorted(LUA.glob("*.lua")), ids=lambda p: p.name)
def test_no_lua_script_names_a_key(path: Path) -> None:
    namespaces = _namespaces()
    bad = [
        f"{path.name}:{line}: {text!r}"
        for line, text in string_literals(path.read_text())
        if any(ns in text for ns in namespaces)
    ]
    assert not bad, "key names built inside a Lua script (pass them in KEYS/ARGV from Keys):\n" + (
        "\n".join(bad)
    )


@pytest.mark.parametrize(
    "path", sorted(p for p in LUA.glob("*.lua") if p.name != "common.lua"), ids=lambda p: p.name
)
def test_every_script_documents_its_keys(path: Path) -> None:
    """The header comment lists KEYS in order: the caller's contract with the script."""
    header = [line for line in path.read_text().splitlines() if line.startswith("--")]
    assert any(line.startswith("-- KEYS:") for line in header), f"{path.name}: no '-- KEYS:' line"
