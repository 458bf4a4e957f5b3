"""Chaos: kill it, restart its servers, run two of it — and lose nothing.

Runs a steady load — WebSocket users asking for blocks with unique texts, ``tts-worker
--simulated`` GPU workers — against ``tts-daemon run`` processes on Redis and Postgres servers this
tool owns, injects faults on a schedule, then drains and reconciles exactly: every block a user
asked for reached a terminal status, every delivered block has exactly one ``usage_log`` row with
the right amount, nothing else is billed, and the subscription counters agree with the log.

Faults (``--scenario``): ``daemon-kill`` (SIGKILL at a random moment, restart), ``sigterm``
(graceful stop under load: exit 0 within 10 s, restart), ``billing`` (the billing service fails
repeatedly: injected through TTS_DAEMON_FAULTS), ``redis`` (Redis restarted gracefully, killed
with SIGKILL, and crashed: a host crash emulated by killing it and cutting its AOF back to what
was last fsynced; ``--appendfsync`` picks the fsync policy), ``redis-crash`` (only the crash: with
``--appendfsync everysec``, the loss window), ``postgres`` (Postgres stopped — fast
or SIGKILL — and unreachable for a while), ``worker-kill`` (a GPU worker SIGKILLed mid-job),
``two-daemons`` (two daemons on the same Redis and Postgres, one killed and left down a while),
``hostile-worker`` (for a while, a worker answers the jobs it pulls with results that break the
contract — ``NaN`` and ``Infinity`` durations, bad base64, ``text/html``, another variant, not
JSON — or forge the payer and the text length: the blocks fail recoverably and are asked again,
nothing is billed wrong), and ``mixed`` (all of them, at random, against two daemons).

After each fault it measures the time to recover: every daemon healthy (``/healthz`` 200 with all
services running) and a probe block synthesized end to end through each of them. Clients behave as
a browser would: they reconnect after a closed connection and ask again for the blocks that have no
terminal status yet (a repeat joins the job in flight or is answered from the cache: no second job,
no second bill), back off after ``error`` frames, and never wait without a deadline.

    python -m tools.chaos --scenario mixed --load-s 180 --json var/chaos.json
    python -m tools.chaos --scenario redis-crash --appendfsync everysec --json var/chaos-es.json

(``python tools/chaos ...`` works too.) docs/reliability.md describes the method and the figures.
The engine lives here, in the harness, so that the fault tests (tests/test_faults_chaos.py) drive
it directly; ``tools/chaos`` is its command line.

The package, a module per part: ``params`` (scenarios, knobs), ``clients`` (the load), ``clock``
(the write clock), ``hostcrash`` (with ``fsync_shim.c``, compiled at run time), ``state`` (what a
run holds), ``fleet`` (servers, daemons, workers), ``faults`` (injection, recovery), ``verdict``
(drain, reconciliation) and ``run`` (:class:`Chaos`, one run). The command line: tools/chaos/cli.py.
"""

from daemon.testing.chaos.params import SCENARIOS, Params
from daemon.testing.chaos.run import Chaos

__all__ = ["SCENARIOS", "Chaos", "Params"]
