"""Extraction cost vs a bare forward pass, and peak memory at two dataset sizes.

Reference (same batches, same model): ``model(**batch, output_hidden_states=True)``. Target:
extraction (hooks + pooling + Parquet shards) takes at most 1.10x the reference's time, and its
peak resident memory is the same (within 10%) at N and 4N samples, i.e. it streams. Each
measurement runs in a fresh process so peak RSS is its own. Writes ``results/bench/extract.json``.

    python benchmarks/bench_extract.py --n 200          # model: the tiny world's tuned VLM
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def measure(mode: str, model: str, data: str, n: int, batch_size: int) -> dict:
    """Run one measurement in this process (called through a subprocess)."""
    import pandas as pd
    import torch

    from vlmlayers import extract, prompts
    from vlmlayers.models import ModelSpec, load
    from vlmlayers.runtime import setup_torch

    setup_torch(seed=0)
    loaded = load(ModelSpec(name="bench", path=model))
    frame = pd.read_parquet(data).head(n)
    start = time.perf_counter()
    if mode == "forward":
        with torch.no_grad():
            for i in range(0, len(frame), batch_size):
                batch = prompts.encode_rows(loaded, frame.iloc[i : i + batch_size], "image", 2)
                loaded.model(**batch, output_hidden_states=True)
    else:
        args = argparse.Namespace(
            model="bench",
            revision=None,
            modality="image",
            n_captions=2,
            store_dtype="float32",
            shard_size=256,
        )
        with tempfile.TemporaryDirectory() as tmp:
            manifest = extract.extraction_manifest(
                loaded, model, Path(data), args, list(extract.POOLINGS), len(frame)
            )
            extract.extract(loaded, frame, Path(tmp) / "store", manifest, batch_size, 256, 2)
    seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"mode": mode, "n": len(frame), "seconds": seconds, "peak_rss_mb": peak_mb}


def run_isolated(mode: str, args: argparse.Namespace, n: int) -> dict:
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "--_child",
            mode,
            "--model",
            args.model,
            "--data",
            args.data,
            "--n",
            str(n),
            "--batch-size",
            str(args.batch_size),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "results/models/tuned"))
    parser.add_argument("--data", default=str(ROOT / "results/world/analysis.parquet"))
    parser.add_argument("--n", type=int, default=200, help="smaller size; the larger is 4n")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", type=Path, default=ROOT / "results/bench/extract.json")
    parser.add_argument("--_child", choices=["forward", "extract"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._child:
        print(json.dumps(measure(args._child, args.model, args.data, args.n, args.batch_size)))
        return
    from vlmlayers.io import write_json

    forward = run_isolated("forward", args, args.n)
    small = run_isolated("extract", args, args.n)
    large = run_isolated("extract", args, 4 * args.n)
    report = {
        "reference": forward,
        "extract_small": small,
        "extract_large": large,
        "time_ratio": small["seconds"] / forward["seconds"],
        "time_target": 1.10,
        "memory_ratio_4x_samples": large["peak_rss_mb"] / small["peak_rss_mb"],
        "memory_target": 1.10,
    }
    write_json(report, args.out)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
