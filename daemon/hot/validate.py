"""The worker-result boundary: every result is checked here, once, before the hot path acts on it.

Workers are programs written by others and run anywhere (docs/workers.md), so a result is input,
like a client frame. :func:`check_result` decides, without ever raising, what a claimed result
is: audio, an empty "nothing to say", a worker's error, a result for no job the daemon has (a
duplicate: stored nowhere, billed never), or a refusal with its reason. Everything the bill
depends on (payer, text length, model, multiplier) comes from the job the daemon wrote at
enqueue, never from the result: the result contributes only its audio, duration and timings.
"""

from __future__ import annotations

import json
import math
from typing import Any

import attrs

from daemon.contracts import ContractError, Job, audio_content_type
from daemon.stores.redis import ClaimedResult

__all__ = [
    "Checked",
    "NoJob",
    "Refused",
    "check_result",
]

# docs/workers.md: the limits a result must keep.
MAX_ID_CHARS = 128  # job_id, variant_hash
MAX_WORKER_ID_CHARS = 200
MAX_DURATION_MS = 2**31 - 1  # the usage_log column is an integer
MAX_TIMING_MS = 10**12
MAX_ERROR_CHARS = 500


@attrs.frozen
class Checked:
    """A result that passed: what to do with its job."""

    job: Job
    kind: str  # audio | skipped | error
    worker_id: str
    queue_wait_ms: float
    processing_time_ms: float
    duration_ms: int = 0
    content_type: str = ""
    error: str = ""


@attrs.frozen
class Refused:
    """A result refused at the boundary: dead-lettered with ``reason``; ``job`` (when the result
    names one the daemon has) fails with a recoverable error."""

    reason: str
    job: Job | None
    job_id: str
    worker_id: str


@attrs.frozen
class NoJob:
    """A valid result for a job the daemon does not have (finalized already, or never made)."""

    job_id: str
    variant_hash: str
    worker_id: str


def _no_constants(name: str) -> Any:
    raise ContractError(f"result: {name} is not a number JSON allows")


def _printable(value: str, limit: int) -> str:
    return value[:limit].encode("ascii", "backslashreplace").decode("ascii")


def _number(d: dict[str, Any], name: str, *, limit: float, required: bool) -> float:
    value = d.get(name)
    if value is None:
        if required:
            raise ContractError(f"result: field {name!r} is missing or null")
        return 0.0
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ContractError(f"result: field {name!r} is not a number")
    if not math.isfinite(value) or not 0 <= value <= limit:
        raise ContractError(f"result: field {name!r} out of range (0..{limit:g})")
    return float(value)


def _identify(d: dict[str, Any]) -> tuple[str, str]:
    job_id = d.get("job_id")
    worker_id = d.get("worker_id")
    return (
        _printable(job_id, MAX_ID_CHARS) if isinstance(job_id, str) else "",
        _printable(worker_id, MAX_WORKER_ID_CHARS) if isinstance(worker_id, str) else "",
    )


def check_result(item: ClaimedResult, *, max_audio_bytes: int) -> Checked | Refused | NoJob:
    """What ``item`` is (docs/workers.md, "What a result must be"). Never raises."""
    # The job the result names, as claim.lua found it (Redis's own JSON reader took the id, so a
    # result Python cannot even decode, e.g. invalid UTF-8, still fails its job).
    job: Job | None = None
    problem = item.problem
    if item.job:
        try:
            job = Job.from_json(item.job)
        except ContractError:
            problem = problem or "the job this result names cannot be read"
    try:
        d = json.loads(item.meta, parse_constant=_no_constants) if item.meta else None
    except ContractError as exc:
        d, problem = None, problem or str(exc)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        d, problem = None, problem or f"result: not JSON: {type(exc).__name__}: {exc}"[:300]
    if not isinstance(d, dict):
        reason = problem or "result: not a JSON object"
        return Refused(reason, job, job.job_id if job else "", "")
    job_id, worker_id = _identify(d)
    try:
        if problem:
            raise ContractError(problem)
        checked = _check_fields(d, max_audio_bytes, item.audio_len, worker_id)
    except ContractError as exc:
        return Refused(str(exc), job, job_id, worker_id)
    if job is None:
        return NoJob(job_id, str(d["variant_hash"]), worker_id)
    if job.job_id != job_id or job.variant_hash != d["variant_hash"]:
        return Refused("result: variant_hash does not match its job", job, job_id, worker_id)
    return attrs.evolve(checked, job=job)


_PLACEHOLDER = Job("", "", "", "", "", 0, "", 0, 0.0, 0.0)


def _check_fields(
    d: dict[str, Any], max_audio_bytes: int, audio_len: int, worker_id: str
) -> Checked:
    for name in ("job_id", "variant_hash"):
        value = d.get(name)
        if not isinstance(value, str) or not 0 < len(value) <= MAX_ID_CHARS:
            raise ContractError(f"result: field {name!r} must be a string of 1..{MAX_ID_CHARS}")
    if "worker_id" in d and not isinstance(d["worker_id"], str | None):
        raise ContractError("result: field 'worker_id' is not a string")
    timings = {
        name: _number(d, name, limit=MAX_TIMING_MS, required=False)
        for name in ("queue_wait_ms", "processing_time_ms")
    }
    common: dict[str, Any] = {"job": _PLACEHOLDER, "worker_id": worker_id, **timings}
    error = d.get("error")
    if error is not None:
        if not isinstance(error, str):
            raise ContractError("result: field 'error' is not a string")
        return Checked(kind="error", error=error[:MAX_ERROR_CHARS], **common)
    if not isinstance(d.get("audio_base64"), str) or audio_len < 0:
        raise ContractError("result: field 'audio_base64' is missing or not a string")
    if audio_len // 4 * 3 > max_audio_bytes:
        raise ContractError(f"result: audio larger than {max_audio_bytes} bytes")
    duration = _number(d, "duration_ms", limit=MAX_DURATION_MS, required=True)
    content_type = audio_content_type(d.get("content_type"))
    if content_type is None:
        raise ContractError("result: field 'content_type' must be an audio/* media type")
    return Checked(
        kind="audio" if audio_len > 0 else "skipped",
        duration_ms=int(duration),
        content_type=content_type,
        **common,
    )
