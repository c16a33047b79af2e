"""Model vs model on identical inputs, per layer: neighbourhood overlap, linear CKA and SVCCA.

``vlmlayers compare --models A B --image A_STORE B_STORE --text A_STORE B_STORE --out T.parquet``
compares the activation stores (``vlmlayers.activations``) of two models on the same dataset and
prompt form: e.g. tuned vs aligned on image and on text prompts, aligned vs base and tuned vs base
on text prompts (DESIGN.md, "Models compared"). Rows are joined by sample id
(``activations.load_paired``: the two stores must hold the same ids in the same order, and their
manifests the same dataset hash and prompt form). Layer l of A is compared with layer l of B, so
relative depth l / L matches only when both models have the same number of layers L; otherwise
the stage stops with an error naming both stores. Layer 0 at the ``last`` pooling is the same
embedding for every sample and is skipped unless ``--no-skip-layer-zero``.

Per layer, tap, pooling and modality (the estimators of ``vlmlayers.geometry``; one ``Pairwise``
per model and layer serves all three):

* ``neighbour_overlap``: shared fraction of the k nearest neighbours (k = 30; Doimo et al. 2020),
  with a percentile bootstrap CI over samples; scale = k;
* ``cka_linear``: linear CKA (Kornblith et al. 2019); scale NaN, no CI;
* ``svcca``: mean canonical correlation after keeping the top singular directions that explain
  ``--svcca-variance`` (0.99) of each model's variance (Raghu et al. 2017); scale = that fraction,
  no CI.

Output: one tidy Parquet with the columns of ``COLUMNS``: ``model`` is ``"A~B"`` (the two names
in the order of ``--models``, e.g. ``tuned~aligned``, as ``image~text`` names an image-vs-text
row of the geometry table), ``model_a`` / ``model_b`` name each; ``modality`` is the prompt form
both models saw (``image`` or ``text``); ``tap`` the tap point (``residual`` by default).
"""

from __future__ import annotations

import argparse
import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from vlmlayers import geometry

COLUMNS = (
    "layer", "relative_depth", "model", "model_a", "model_b", "modality", "pooling", "tap",
    "metric", "scale", "value", "ci_low", "ci_high", "n", "seed",
)  # fmt: skip
MODALITIES = ("image", "text")


def pair_name(a: str, b: str) -> str:
    """The ``model`` value of a comparison row: ``"A~B"``."""
    return f"{a}~{b}"


def n_layers(root: str | Path, tap: str = "residual") -> int:
    """Number of decoder blocks of the store's model (manifest ``n_layers``, else the deepest
    stored layer)."""
    from vlmlayers import activations

    manifest = activations.read_manifest(root)
    if manifest.get("n_layers") is not None:
        return int(manifest["n_layers"])
    return max(activations.layers(root, tap))


def check_same_inputs(a_root: str | Path, b_root: str | Path, tap: str = "residual") -> int:
    """The two stores' common number of layers; raises if the depths, the dataset or the prompt
    form differ (the comparison is only defined on identical inputs at matching depth)."""
    from vlmlayers import activations

    ma, mb = activations.read_manifest(a_root), activations.read_manifest(b_root)
    for key in ("dataset_sha256", "modality"):
        if ma.get(key) is not None and mb.get(key) is not None and ma[key] != mb[key]:
            raise ValueError(
                f"{a_root} and {b_root} differ in {key} ({ma[key]!r} vs {mb[key]!r}): "
                "models are compared on identical inputs only"
            )
    la, lb = n_layers(a_root, tap), n_layers(b_root, tap)
    if la != lb:
        raise ValueError(
            f"{a_root} has {la} layers and {b_root} has {lb}: layers are matched by relative "
            "depth only between models with the same number of layers"
        )
    return la


def compare_stores(
    a_root: str | Path,
    b_root: str | Path,
    *,
    poolings: list[str] = ("last",),
    taps: list[str] = ("residual",),
    k: int = 30,
    svcca_variance: float = 0.99,
    n_boot: int = 1000,
    seed: int = 0,
    skip_layer_zero: bool = True,
    device: str | None = None,
    dtype: str = "float64",
) -> list[dict]:
    """Rows (without the model and modality columns) comparing two stores layer by layer."""
    from tqdm import tqdm

    from vlmlayers import activations

    rows: list[dict] = []
    for tap in taps:
        depth = check_same_inputs(a_root, b_root, tap)
        la, lb = activations.layers(a_root, tap), activations.layers(b_root, tap)
        layers = sorted(set(la) & set(lb))
        if set(la) != set(lb):
            warnings.warn(
                f"{a_root} stores layers {la}, {b_root} {lb}; comparing the common {layers}",
                stacklevel=2,
            )
        itemsize = np.dtype(str(dtype).removeprefix("torch.")).itemsize
        for pooling in poolings:
            wanted = [x for x in layers if not (skip_layer_zero and pooling == "last" and x == 0)]
            if not wanted or not _stored(a_root, b_root, wanted[0], pooling, tap):
                continue
            base = {"pooling": pooling, "tap": tap, "seed": seed}
            roots = [a_root, b_root]
            with tqdm(total=len(wanted), desc=f"compare {tap} {pooling}", unit="layer") as bar:
                for batch in geometry.layer_batches(roots, wanted, pooling, tap, itemsize):
                    rows += _batch_rows(
                        batch, depth, base, (a_root, b_root), k, svcca_variance, n_boot, seed,
                        device, dtype,
                    )  # fmt: skip
                    bar.update(len(batch))
    return rows


def _stored(a_root, b_root, layer: int, pooling: str, tap: str) -> bool:
    """Whether both stores hold ``pooling`` (warns and skips it if not)."""
    from vlmlayers import activations

    for root in (a_root, b_root):
        try:
            activations.load(root, layer, pooling, tap)
        except KeyError:
            warnings.warn(f"{root}: pooling {pooling!r} not stored; skipped", stacklevel=3)
            return False
    return True


def _batch_rows(batch, depth, base, roots, k, variance, n_boot, seed, device, dtype) -> list[dict]:
    from vlmlayers.stats import bootstrap_ci, relative_depth

    names = [layer for layer, _, _ in batch]
    stacked = [np.stack([arrays[i] for _, _, arrays in batch]) for i in range(2)]
    pa, pb = (
        geometry.pairwise(
            x, device=device, dtype=dtype, layers=names, context=f"{root} {base['pooling']}"
        )
        for x, root in zip(stacked, roots, strict=True)
    )
    overlap = geometry.neighbourhood_overlap(pa, pb, k=k, per_point=True)
    cka = geometry.linear_cka(pa, pb)
    svcca = geometry.svcca(pa, pb, variance=variance)
    n = pa.n_points
    rows = []
    for i, layer in enumerate(names):
        where = base | {"layer": layer, "relative_depth": float(relative_depth(layer, depth))}
        values = overlap[i][np.isfinite(overlap[i])]
        if len(values):
            low, high = bootstrap_ci(values, n_boot=n_boot, seed=seed)
            ci = (low, high)
            rows.append(_row(where, "neighbour_overlap", k, np.mean(values), ci, len(values)))
        else:
            rows.append(_row(where, "neighbour_overlap", k, math.nan, n=0))
        rows.append(_row(where, "cka_linear", math.nan, cka[i], n=n))
        rows.append(_row(where, "svcca", variance, svcca[i], n=n))
    return rows


def _row(where: dict, metric: str, scale, value, ci=(math.nan, math.nan), n: int = 0) -> dict:
    return where | {
        "metric": metric, "scale": float(scale), "value": float(value), "ci_low": float(ci[0]),
        "ci_high": float(ci[1]), "n": int(n),
    }  # fmt: skip


# --------------------------------------------------------------------------------------------
# The stage


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--models", nargs=2, required=True, metavar=("A", "B"), help="the two models' names"
    )
    for modality in MODALITIES:
        parser.add_argument(
            f"--{modality}",
            nargs=2,
            type=Path,
            metavar=("A_STORE", "B_STORE"),
            help=f"activation stores of A and B on the {modality} prompts",
        )
    parser.add_argument("--poolings", nargs="+", default=["last"], help="default: last")
    parser.add_argument("--taps", nargs="+", default=["residual"], help="default: residual")
    parser.add_argument("--k", type=int, default=30, help="neighbours for the overlap (30)")
    parser.add_argument(
        "--svcca-variance", type=float, default=0.99, help="variance SVCCA keeps (0.99)"
    )
    geometry.add_run_arguments(parser)


def run(args: argparse.Namespace) -> None:
    from vlmlayers import io, runtime

    runtime.setup_torch(seed=args.seed)
    pairs = {m: getattr(args, m) for m in MODALITIES if getattr(args, m) is not None}
    if not pairs:
        raise SystemExit("vlmlayers compare: give --image and/or --text (two stores each)")
    a, b = args.models
    rows = []
    for modality, (a_root, b_root) in pairs.items():
        found = compare_stores(
            a_root,
            b_root,
            poolings=args.poolings,
            taps=args.taps,
            k=args.k,
            svcca_variance=args.svcca_variance,
            n_boot=args.n_boot,
            seed=args.seed,
            skip_layer_zero=args.skip_layer_zero,
            device=args.device,
            dtype=args.dtype,
        )
        names = {"model": pair_name(a, b), "model_a": a, "model_b": b, "modality": modality}
        rows += [row | names for row in found]
    table = pd.DataFrame(rows, columns=list(COLUMNS))
    table = table.astype({"layer": "int64", "scale": "float64", "n": "int64", "seed": "int64"})
    io.write_parquet(table, args.out)
