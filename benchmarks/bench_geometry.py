"""Benchmark: vlmlayers.geometry against DADApy 0.3.4 called layer by layer.

Per layer, for two representations A and B of the same samples: TwoNN and GRIDE of each, and the
A-vs-B neighbourhood overlap. DADApy is used at its most economical: one object per
representation, whose 100 nearest neighbours (one kNN search, a GEMM over all pairs) serve TwoNN,
GRIDE (range_max <= 100) and the overlap; vlmlayers does one Gram matrix per representation for
all layers in a batch. Checks that the values agree and writes timings and the speed-up to JSON.
On CPU in float64 both sides are bound by those matrix products (ours use the symmetric BLAS
kernel, half the flops); the large speed-ups come from a GPU (``--device cuda``).

    python benchmarks/bench_geometry.py                       # the full size: 33 x 2,500 x 4,096
    python benchmarks/bench_geometry.py --layers 3 --n 500 --dim 256   # a quick run
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import io
import json
import math
import os
import platform
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch

from vlmlayers import geometry
from vlmlayers.io import write_json


def import_dadapy() -> types.SimpleNamespace:
    """DADApy's IdEstimation and MetricComparisons classes (ImportError if it is not installed).

    ``import dadapy`` needs jax, flax and optax (its package __init__ imports DiffImbalance) and its
    Cython extensions, which the 0.3.4 sdist builds against numpy < 2 and which therefore do not
    load under numpy 2. The estimators compared here are pure Python, so when the normal import
    fails their modules are loaded without the package __init__, with an empty stand-in for the
    compiled overlap kernel (``return_data_overlap(use_cython=False)`` is used).
    """
    spec = importlib.util.find_spec("dadapy")
    if spec is None:
        raise ImportError("dadapy is not installed")
    if not getattr(sys.modules.get("dadapy"), "_stand_in", False):
        try:
            # numpy prints a traceback of its own when a numpy-1 extension fails to load.
            with contextlib.redirect_stderr(io.StringIO()):
                module = importlib.import_module("dadapy")
            return types.SimpleNamespace(
                IdEstimation=module.IdEstimation,
                MetricComparisons=module.MetricComparisons,
                version=_version(),
                shim=False,
            )
        except ImportError:
            pass
        for name in [m for m in sys.modules if m == "dadapy" or m.startswith("dadapy.")]:
            del sys.modules[name]
        package = importlib.util.module_from_spec(spec)  # the package, its __init__ not run
        package._stand_in = True
        compiled = types.ModuleType("dadapy._cython")
        compiled.__path__ = []
        compiled.cython_overlap = types.ModuleType("dadapy._cython.cython_overlap")
        sys.modules.update(
            {
                "dadapy": package,
                "dadapy._cython": compiled,
                "dadapy._cython.cython_overlap": compiled.cython_overlap,
            }
        )
    id_estimation = importlib.import_module("dadapy.id_estimation")
    metric_comparisons = importlib.import_module("dadapy.metric_comparisons")
    return types.SimpleNamespace(
        IdEstimation=id_estimation.IdEstimation,
        MetricComparisons=metric_comparisons.MetricComparisons,
        version=_version(),
        shim=True,
    )


def _version() -> str:
    from importlib.metadata import version

    return version("dadapy")


def synthetic_layers(
    n_layers: int, n: int, dim: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Two float32 (L, N, D) representations of the same samples with a layer-dependent ID.

    Each layer: a shared latent of dimension 4..20 (rising then falling with depth), mapped to D
    by different random linear maps plus a tanh bend, with independent noise, so that IDs, overlaps
    and imbalances are non-trivial.
    """
    rng = np.random.default_rng(seed)
    a = np.empty((n_layers, n, dim), dtype=np.float32)
    b = np.empty((n_layers, n, dim), dtype=np.float32)
    for layer in range(n_layers):
        depth = layer / max(n_layers - 1, 1)
        latent_dim = int(round(4 + 16 * np.sin(np.pi * depth)))
        z = rng.normal(size=(n, latent_dim))
        for out in (a, b):
            w = rng.normal(size=(latent_dim, dim)) / np.sqrt(latent_dim)
            noise = 0.05 * rng.normal(size=(n, dim))
            out[layer] = np.tanh(z @ w) + noise
    return a, b


def run_ours(a, b, args) -> dict:
    """All layers, in batches sized by geometry.MEMORY_BUDGET, one Gram matrix per input."""
    n_layers, n, dim = a.shape
    itemsize = torch.empty((), dtype=getattr(torch, args.dtype)).element_size()
    step = max(1, geometry.MEMORY_BUDGET // (2 * (3 * n * n + n * dim) * itemsize))
    out = {"twonn_a": [], "twonn_b": [], "gride_a": [], "gride_b": [], "overlap": []}
    for start in range(0, n_layers, step):
        chunk = slice(start, min(start + step, n_layers))
        pa = geometry.pairwise(a[chunk], device=args.device, dtype=args.dtype)
        pb = geometry.pairwise(b[chunk], device=args.device, dtype=args.dtype)
        # GRIDE first: its neighbour lists are the longest and are reused by the others.
        out["gride_a"].append(geometry.gride(pa, range_max=args.range_max).id)
        out["gride_b"].append(geometry.gride(pb, range_max=args.range_max).id)
        out["twonn_a"].append(geometry.twonn(pa))
        out["twonn_b"].append(geometry.twonn(pb))
        out["overlap"].append(geometry.neighbourhood_overlap(pa, pb, k=args.k))
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return {key: np.concatenate(value) for key, value in out.items()}


def run_dadapy(dadapy, a, b, args) -> dict:
    out = {"twonn_a": [], "twonn_b": [], "gride_a": [], "gride_b": [], "overlap": []}
    for layer in range(a.shape[0]):
        data = {}
        for name, x in (("a", a[layer]), ("b", b[layer])):
            ie = dadapy.IdEstimation(coordinates=x)
            out[f"twonn_{name}"].append(ie.compute_id_2NN(mu_fraction=0.9)[0])
            out[f"gride_{name}"].append(ie.return_id_scaling_gride(range_max=args.range_max)[0])
            data[name] = ie
        mc = dadapy.MetricComparisons(distances=(data["a"].distances, data["a"].dist_indices))
        out["overlap"].append(
            mc.return_data_overlap(
                dist_indices=data["b"].dist_indices, k=args.k, use_cython=not dadapy.shim
            )
        )
    return {key: np.asarray(value) for key, value in out.items()}


def compare(ours: dict, ref: dict) -> dict:
    report = {}
    for key in ours:
        x, y = np.asarray(ours[key], dtype=np.float64), np.asarray(ref[key], dtype=np.float64)
        if key == "overlap":
            report[key] = {
                "max_abs_diff": float(np.max(np.abs(x - y))),
                "exact": bool((x == y).all()),
            }
        else:
            report[key] = {"max_rel_diff": float(np.max(np.abs(x - y) / np.abs(y)))}
    return report


def _best_of(repeats: int, fn, *args):
    best, out = math.inf, None
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        out = fn(*args)
        best = min(best, time.perf_counter() - t0)
    return best, out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=33)
    parser.add_argument("--n", type=int, default=2500)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--k", type=int, default=30)
    parser.add_argument("--range-max", type=int, default=64)
    parser.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    parser.add_argument("--device", default=None, help="auto (default), cpu, cuda")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1, help="report the best of n timings")
    parser.add_argument("--no-dadapy", action="store_true", help="time vlmlayers only")
    parser.add_argument("--out", type=Path, default=Path("results/bench/geometry.json"))
    args = parser.parse_args(argv)

    a, b = synthetic_layers(args.layers, args.n, args.dim, args.seed)
    dadapy = None if args.no_dadapy else import_dadapy()
    warm = a[:1, : min(args.n, 200)], b[:1, : min(args.n, 200)]
    run_ours(*warm, args)  # first calls pay for thread pools, allocator and lazy imports
    if dadapy is not None:
        run_dadapy(dadapy, *warm, args)
    t_ours, ours = _best_of(args.repeats, run_ours, a, b, args)
    result = {
        "config": vars(args) | {"out": str(args.out)},
        "device": str(geometry._resolve(args.device, args.dtype)[0]),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "machine": platform.machine(),
        "seconds_vlmlayers": t_ours,
        "values_vlmlayers": {key: value.tolist() for key, value in ours.items()},
    }
    if dadapy is not None:
        t_ref, ref = _best_of(args.repeats, run_dadapy, dadapy, a, b, args)
        result |= {
            "dadapy": dadapy.version,
            "dadapy_loaded_without_package_init": dadapy.shim,
            "seconds_dadapy": t_ref,
            "speedup": t_ref / t_ours,
            "agreement": compare(ours, ref),
        }
    write_json(result, args.out)
    summary = {k: v for k, v in result.items() if k not in ("values_vlmlayers", "config")}
    print(json.dumps(summary, indent=2))
    return result


if __name__ == "__main__":
    main()
