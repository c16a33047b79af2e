"""Workflow overhead: DAG building and a no-op rerun, against Snakemake's own start-up.

Measured, each as the median of ``--repeats`` runs in this checkout:

* reference: ``snakemake --version`` (interpreter + Snakemake import, nothing of ours);
* ``dry_run``: ``snakemake -n`` of each config given (``config/paper.yaml`` when present: the
  real-model DAG, target under 10 s);
* ``noop``: ``snakemake --cores 1`` of the default config when its results are complete (target
  under 5 s); "not measured" with the reason otherwise (run ``make run`` first).

Writes ``results/bench/workflow.json`` with seconds and ratios to the reference.

    python benchmarks/bench_workflow.py --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {"dry_run": 10.0, "noop": 5.0}


def timed(args: list[str], repeats: int) -> tuple[float, subprocess.CompletedProcess]:
    """Median wall seconds of ``python -m snakemake *args`` in the checkout, and the last run."""
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "snakemake", *args], cwd=ROOT, capture_output=True, text=True
        )
        seconds.append(time.perf_counter() - start)
        if proc.returncode != 0:
            raise SystemExit(f"snakemake {' '.join(args)} failed:\n{proc.stderr[-2000:]}")
    return statistics.median(seconds), proc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--configs", nargs="*", default=["config/config.yaml", "config/paper.yaml"])
    parser.add_argument("--out", type=Path, default=ROOT / "results/bench/workflow.json")
    args = parser.parse_args()
    from vlmlayers.io import write_json

    reference, _ = timed(["--version"], args.repeats)
    report: dict = {"reference_seconds": reference, "targets_seconds": TARGETS, "dry_run": {}}
    for config in args.configs:
        if not (ROOT / config).exists():
            report["dry_run"][config] = {"not_measured": f"{config} does not exist"}
            continue
        seconds, _ = timed(["-n", "--cores", "1", "--configfile", config], args.repeats)
        report["dry_run"][config] = {"seconds": seconds, "ratio_to_reference": seconds / reference}
    pending = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "--cores", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    if "Nothing to be done" in pending.stdout + pending.stderr:
        seconds, _ = timed(["--cores", "1"], args.repeats)
        report["noop"] = {"seconds": seconds, "ratio_to_reference": seconds / reference}
    else:
        report["noop"] = {"not_measured": "the default config's results are incomplete: make run"}
    write_json(report, args.out)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
