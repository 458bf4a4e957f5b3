"""The command line: ``python -m tools.chaos --scenario mixed`` (or ``python tools/chaos``)."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import attrs
import trio

from daemon.testing.chaos import __doc__ as PACKAGE_DOC
from daemon.testing.chaos.params import SCENARIOS, Params
from daemon.testing.chaos.run import Chaos
from daemon.testing.options import add_param_options, params_from


def print_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"tools/chaos — scenario {result['scenario']}")
    table.add_column("")
    table.add_column("value", justify="right")
    rows = [
        ("faults injected", ", ".join(f"{k} {v}" for k, v in result["faults_injected"].items())),
        ("blocks / delivered / billed",
         f"{result['blocks']} / {result['delivered']} / {result['billed']}"),
        ("lost", str(result["lost"])),
        ("double-billed", str(result["double_billed"])),
        ("wrong amount / phantom rows",
         f"{result['wrong_amount']} / {result['phantom_rows']}"),
        ("recover s p50 / max",
         f"{result['recover_s']['p50']:.2f} / {result['recover_s']['max']:.2f}"),
        ("client sessions / ack timeouts",
         f"{result['clients']['sessions']} / {result['clients']['ack_timeouts']}"),
        ("billing failures injected", str(result["billing_injected_failures"])),
    ]  # fmt: skip
    for kind, v in result["recover_s"]["by_kind"].items():
        rows.append((f"  recover {kind} (n={v['n']})", f"{v['p50']:.2f} / {v['max']:.2f}"))
    if result["loss_window"]:
        lw = result["loss_window"]
        rows.append(
            (
                f"Redis loss window ({lw['appendfsync']})",
                f"{lw['acked_writes_lost']} writes, {lw['seconds_of_writes_lost_max']:.3f} s max",
            )
        )
    for name, ok in result["verified"].items():
        rows.append((name, "yes" if ok else "NO"))
    for label, value in rows:
        table.add_row(label, value)
    Console().print(table)


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, Params]:
    ap = argparse.ArgumentParser(
        prog="python -m tools.chaos", description=(PACKAGE_DOC or "").split("\n\n")[0]
    )
    ap.add_argument("--json", type=Path, help="write the figures here")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs, data)")
    choices = {"scenario": sorted(SCENARIOS), "appendfsync": ("always", "everysec")}
    add_param_options(ap, Params, choices)
    args = ap.parse_args(argv)
    return args, params_from(args, Params)


def main(argv: list[str] | None = None) -> int:
    args, p = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="tts-chaos-"))
    from rich.console import Console

    console = Console(stderr=True)

    def say(message: str) -> None:
        console.log(message)

    try:
        chaos = Chaos(p, work, say)
        result = trio.run(chaos.run)
    finally:
        if args.keep:
            say(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    result["params"] = attrs.asdict(p)
    print_table(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    ok = all(result["verified"].values())
    if not ok:
        failed = [k for k, v in result["verified"].items() if not v]
        print(f"chaos: verification FAILED: {', '.join(failed)}", file=sys.stderr)
    return 0 if ok else 1
