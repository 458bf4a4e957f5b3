"""The fault-injection hook (daemon/runtime/faults.py): off unless asked for, exact when it is."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from daemon.runtime.faults import (
    ENV_VAR,
    FaultInjector,
    FaultSpecError,
    InjectedFault,
    from_env,
    parse_spec,
)


def test_off_unless_the_variable_is_set() -> None:
    assert from_env({}) is None
    assert from_env({ENV_VAR: "  "}) is None


async def test_a_fixed_spec_fails_exactly_the_points_it_names() -> None:
    injector = from_env({ENV_VAR: "billing.after_commit=1, billing.before_batch=0"})
    assert injector is not None
    await injector("billing.before_batch")  # probability 0: never
    with pytest.raises(InjectedFault, match=re.escape("billing.after_commit")):
        await injector("billing.after_commit")
    assert injector.injected == {"billing.after_commit": 1}


async def test_a_spec_file_switches_faults_on_and_off_while_running(tmp_path: Path) -> None:
    spec = tmp_path / "faults"
    injector = from_env({ENV_VAR: f"@{spec}"})
    assert isinstance(injector, FaultInjector)
    await injector("billing.after_commit")  # no file yet: nothing injected
    spec.write_text("billing.after_commit=1\n")
    with pytest.raises(InjectedFault):
        await injector("billing.after_commit")
    spec.write_text("")
    await injector("billing.after_commit")  # emptied: off again
    assert injector.injected == {"billing.after_commit": 1}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("billing.after_comit=0.5", "unknown fault point 'billing.after_comit'"),
        ("billing.after_commit=1.5", "billing.after_commit: must be a probability 0..1"),
        ("billing.after_commit", "expected POINT=PROBABILITY"),
        ("seed=x", "seed: must be an integer"),
    ],
)
def test_a_bad_spec_is_refused_with_a_line_naming_it(text: str, message: str) -> None:
    with pytest.raises(FaultSpecError, match=re.escape(message)):
        parse_spec(text)


def test_tts_daemon_run_refuses_a_bad_spec_at_start_up(tmp_path: Path) -> None:
    config = tmp_path / "daemon.toml"
    config.write_text("")
    proc = subprocess.run(
        [sys.executable, "-m", "daemon", "run", "--config", str(config)],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
        env=dict(os.environ, **{ENV_VAR: "billing.nowhere=1"}),
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"tts-daemon: {ENV_VAR}: unknown fault point 'billing.nowhere' "
        "(known: billing.before_batch, billing.after_commit, persist.read, persist.written)"
    ]
