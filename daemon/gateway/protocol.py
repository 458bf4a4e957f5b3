"""The WebSocket protocol of docs/protocol.md: frames in, validated; frames out, built.

Pure functions, no I/O: ``parse_frame`` turns a text frame into a request or raises
:class:`ProtocolError` whose message names the offending field.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

import attrs

__all__ = [
    "MAX_BLOCKS",
    "MAX_BLOCK_IDX",
    "MAX_DOCUMENT_ID",
    "MAX_NAME",
    "MAX_NESTING",
    "MAX_TEXT",
    "Block",
    "CursorMoved",
    "ProtocolError",
    "Synthesize",
    "error_frame",
    "parse_frame",
    "quote",
    "status_frame",
]

MAX_DOCUMENT_ID = 128
MAX_BLOCKS = 64
MAX_BLOCK_IDX = 1_000_000
MAX_TEXT = 2000
MAX_NAME = 64  # model and voice names; the catalog decides which exist
MAX_NESTING = 16  # a valid frame needs 3 (frame → blocks → block); room for future fields


class ProtocolError(Exception):
    """A frame the gateway answers with an ``error`` frame (the connection stays open)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@attrs.frozen
class Block:
    idx: int
    text: str


@attrs.frozen
class Synthesize:
    document_id: str
    model: str
    voice: str | None
    blocks: tuple[Block, ...]


@attrs.frozen
class CursorMoved:
    document_id: str
    block_idx: int


def _bad(message: str) -> ProtocolError:
    return ProtocolError("bad_request", message)


def _int(value: Any, name: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(f"{name}: must be an integer")
    if not lo <= value <= hi:
        raise _bad(f"{name}: must be {lo}..{hi}")
    return value


# JSON may carry escaped lone surrogates ("\\ud800"): they are not text, cannot be encoded as
# UTF-8 (for Redis, the worker, the reply) and are refused wherever a string is accepted.
# Control characters have no place in an identifier; NUL in particular cannot be stored in Postgres
# text/jsonb, where document_id ends up (the billing details).
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


def _str(
    value: Any, name: str, lo: int, hi: int, *, what: str = "characters", ident: bool = False
) -> str:
    if not isinstance(value, str):
        raise _bad(f"{name}: must be a string")
    if not lo <= len(value) <= hi:
        raise _bad(f"{name}: must be {lo}..{hi} {what}")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # only lone surrogates do not encode
            raise _bad(f"{name}: must be valid Unicode (no lone surrogates)") from None
    if ident:
        if _CONTROL.search(value):  # NUL included
            raise _bad(f"{name}: must not contain control characters")
    elif "\x00" in value:
        raise _bad(f"{name}: must not contain NUL characters")
    return value


def _require(frame: Mapping[str, Any], name: str) -> Any:
    if name not in frame:
        raise _bad(f"{name}: missing")
    return frame[name]


def _document_id(frame: Mapping[str, Any]) -> str:
    return _str(_require(frame, "document_id"), "document_id", 1, MAX_DOCUMENT_ID, ident=True)


def _synthesize(frame: Mapping[str, Any]) -> Synthesize:
    document_id = _document_id(frame)
    model = _str(_require(frame, "model"), "model", 1, MAX_NAME, ident=True)
    voice = frame.get("voice")
    if voice is not None:
        voice = _str(voice, "voice", 1, MAX_NAME, ident=True)
    raw_blocks = _require(frame, "blocks")
    if not isinstance(raw_blocks, list):
        raise _bad("blocks: must be a list")
    if not 1 <= len(raw_blocks) <= MAX_BLOCKS:
        raise _bad(f"blocks: must hold 1..{MAX_BLOCKS} blocks")
    blocks = []
    seen: set[int] = set()
    for i, raw in enumerate(raw_blocks):
        if not isinstance(raw, dict):
            raise _bad(f"blocks[{i}]: must be an object")
        idx = _int(_require_block(raw, i, "idx"), f"blocks[{i}].idx", 0, MAX_BLOCK_IDX)
        text = _str(_require_block(raw, i, "text"), f"blocks[{i}].text", 1, MAX_TEXT)
        if idx in seen:
            raise _bad(f"blocks[{i}].idx: duplicate idx {idx}")
        seen.add(idx)
        blocks.append(Block(idx, text))
    return Synthesize(document_id, model, voice, tuple(blocks))


def _require_block(block: Mapping[str, Any], i: int, name: str) -> Any:
    if name not in block:
        raise _bad(f"blocks[{i}].{name}: missing")
    return block[name]


def _cursor_moved(frame: Mapping[str, Any]) -> CursorMoved:
    document_id = _document_id(frame)
    block_idx = _int(_require(frame, "block_idx"), "block_idx", 0, MAX_BLOCK_IDX)
    return CursorMoved(document_id, block_idx)


_PARSERS = {"synthesize": _synthesize, "cursor_moved": _cursor_moved}


def _too_deep(value: Any) -> bool:
    """More than MAX_NESTING levels of objects/arrays? (Iterative: no recursion to exhaust.)"""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > MAX_NESTING:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


def parse_frame(message: str | bytes) -> Synthesize | CursorMoved:
    """Validate one client frame. Model and voice names are checked later, against the catalog."""
    if isinstance(message, bytes | bytearray):
        raise _bad("frame: must be a JSON text frame, not binary")
    try:
        frame = json.loads(message)
    except ValueError as exc:
        raise _bad(f"frame: not valid JSON: {exc.args[0] if exc.args else exc}") from None
    except RecursionError:
        raise _bad(f"frame: JSON nested too deeply (at most {MAX_NESTING} levels)") from None
    if _too_deep(frame):
        # Whether json.loads gives up (above) depends on the caller's stack depth; this does not.
        raise _bad(f"frame: JSON nested too deeply (at most {MAX_NESTING} levels)")
    if not isinstance(frame, dict):
        raise _bad("frame: must be a JSON object")
    kind = frame.get("type")
    if kind is None:
        raise _bad("type: missing")
    if not isinstance(kind, str):
        raise _bad("type: must be a string")
    parser = _PARSERS.get(kind)
    if parser is None:
        raise _bad(f"type: unknown message type {quote(kind)}")
    return parser(frame)


def quote(value: str, limit: int = 40) -> str:
    """A client-supplied string quoted for an error message: cut short, escaped (repr)."""
    return repr(value[:limit]) + ("…" if len(value) > limit else "")


def _dumps(frame: dict[str, Any]) -> str:
    return json.dumps(frame, separators=(",", ":"), ensure_ascii=False)


def error_frame(code: str, message: str) -> str:
    # ASCII-only: an error message may quote client input, and must be sendable whatever it holds.
    return json.dumps(
        {"type": "error", "code": code, "message": message},
        separators=(",", ":"),
        ensure_ascii=True,
    )


def status_frame(
    document_id: str, block_idx: int, status: str, model: str, voice: str, **extra: Any
) -> str:
    frame = {
        "type": "status",
        "document_id": document_id,
        "block_idx": block_idx,
        "status": status,
        "model": model,
        "voice": voice,
    }
    frame.update(extra)
    return _dumps(frame)


def evicted_frame(document_id: str, block_idxs: list[int]) -> str:
    return _dumps({"type": "evicted", "document_id": document_id, "block_idxs": sorted(block_idxs)})
