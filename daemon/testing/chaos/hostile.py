"""The hostile worker (``hostile_worker`` fault): results that break the worker contract, or that
forge the payer and the text length (docs/workers.md, "What a result must be")."""

from __future__ import annotations

import base64
import json

from daemon.contracts import Job, Result

__all__ = ["HOSTILE_KINDS", "REFUSED_KINDS", "hostile_result"]

HOSTILE_KINDS = (
    "nan_duration",
    "infinite_duration",
    "bad_base64",
    "html",
    "other_variant",
    "not_json",
    "forged_payer",
)
# The kinds the daemon refuses (dead-letters, failing the job); a forged payer is accepted and
# billed to the job's creator for its own text.
REFUSED_KINDS = frozenset(HOSTILE_KINDS) - {"forged_payer"}


def hostile_result(job: Job, kind: str, *, forged_user: int) -> bytes:
    """A result for ``job`` as a hostile (or very buggy) worker writes it."""
    data = json.loads(
        Result.for_job(
            job,
            worker_id="chaos-hostile",
            queue_wait_ms=1.0,
            processing_time_ms=1.0,
            audio_base64=base64.b64encode(b"RIFF hostile " + job.job_id.encode()).decode(),
            duration_ms=1000,
            content_type="audio/wav",
        ).to_json()
    )
    if kind == "nan_duration":
        data["duration_ms"] = float("nan")  # json.dumps writes NaN
    elif kind == "infinite_duration":
        data["duration_ms"] = float("inf")
    elif kind == "bad_base64":
        data["audio_base64"] = "!!not base64!!"
    elif kind == "html":
        data["content_type"] = "text/html"
    elif kind == "other_variant":
        data["variant_hash"] = "0" * 40
    elif kind == "not_json":
        return b'{"job_id": "' + job.job_id.encode() + b'", "audio_base64": '
    elif kind == "forged_payer":
        data.update(user_id=forged_user, text_length=10**6, usage_multiplier=50.0)
    return json.dumps(data).encode()
