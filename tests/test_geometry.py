"""Representation geometry: known answers, agreement with DADApy, and the `geometry` stage."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from vlmlayers import activations, geometry
from vlmlayers.cli import main
from vlmlayers.io import write_json

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_geometry.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_geometry", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench_geometry", module)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def dadapy():
    """DADApy's estimator classes; skipped when dadapy is not installed (an optional reference)."""
    if importlib.util.find_spec("dadapy") is None:
        pytest.skip("dadapy not installed")
    return _bench().import_dadapy()


def _embed(points: np.ndarray, dim: int, rng: np.random.Generator) -> np.ndarray:
    """Isometric embedding into ``dim`` dimensions (a random orthonormal frame)."""
    frame, _ = np.linalg.qr(rng.normal(size=(dim, points.shape[1])))
    return points @ frame.T


def _layers(n_layers=3, n=300, dim=20, seed=0) -> np.ndarray:
    """(L, N, D) points with latent dimension 2, 4, 6 ... and a little noise."""
    rng = np.random.default_rng(seed)
    out = []
    for layer in range(n_layers):
        z = rng.normal(size=(n, 2 + 2 * layer))
        out.append(_embed(np.tanh(z), dim, rng) + 0.01 * rng.normal(size=(n, dim)))
    return np.stack(out)


# --------------------------------------------------------------------------------------------
# Known answers


def test_id_of_a_linear_subspace():
    rng = np.random.default_rng(1)
    x = _embed(rng.normal(size=(2000, 5)), 100, rng)
    assert geometry.twonn(x) == pytest.approx(5, rel=0.1)
    profile = geometry.gride(x, range_max=64)
    assert list(profile.scale) == [2, 4, 8, 16, 32, 64]
    assert profile.id[profile.scale <= 32] == pytest.approx(np.full(5, 5.0), rel=0.1)
    assert (profile.error > 0).all() and (profile.error < 0.5).all()


def test_id_of_curved_surfaces_batched():
    """A swiss roll and a sphere (both 2-d) in 100-d, as two 'layers' of one call."""
    rng = np.random.default_rng(2)
    t = 1.5 * np.pi * (1 + 2 * rng.uniform(size=2000))  # sklearn's make_swiss_roll
    roll = np.stack([t * np.cos(t), 21 * rng.uniform(size=2000), t * np.sin(t)], axis=1)
    sphere = rng.normal(size=(2000, 3))
    sphere /= np.linalg.norm(sphere, axis=1, keepdims=True)
    x = np.stack([_embed(roll, 100, rng), _embed(sphere, 100, rng)])
    assert geometry.twonn(x) == pytest.approx([2, 2], rel=0.1)
    profile = geometry.gride(x, range_max=16)
    assert profile.id.shape == (2, 4)
    assert profile.id == pytest.approx(np.full((2, 4), 2.0), rel=0.1)


def test_twonn_by_decimation_looks_past_small_scale_noise():
    # A plane in 12-D with a little isotropic noise (Facco et al. 2017, Fig. 3): on all points
    # TwoNN counts the noise's dimensions too; on sparser subsets it finds the plane, as GRIDE
    # does at the same neighbour rank.
    rng = np.random.default_rng(0)
    plane = rng.uniform(size=(2000, 2)) @ rng.normal(size=(2, 12))
    x = plane + 0.01 * rng.normal(size=plane.shape)
    scaling = geometry.twonn_scaling(x)
    assert list(scaling.scale) == [2, 4, 8, 16, 32, 64]
    assert scaling.id[0] == geometry.twonn(x) and scaling.id[0] > 4
    assert (np.diff(scaling.id) < 0).all()
    assert scaling.id[-1] == pytest.approx(2, abs=0.2)
    assert geometry.gride(x).id[-1] == pytest.approx(2, abs=0.2)
    assert np.isnan(scaling.error[0]) and (scaling.error[1:] > 0).all()


def test_twonn_scaling_draws_the_same_subsets_in_every_chunk_and_rerun(monkeypatch):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3, 300, 6))
    layers = geometry.twonn_scaling(x, range_max=16, seed=1)
    assert layers.id.shape == layers.error.shape == (3, 4) and list(layers.scale) == [2, 4, 8, 16]
    monkeypatch.setattr(geometry, "MEMORY_BUDGET", 1)  # one layer per chunk
    assert np.array_equal(geometry.twonn_scaling(x, range_max=16, seed=1).id, layers.id)
    other = geometry.twonn_scaling(x, range_max=16, seed=2)
    assert np.array_equal(other.id[:, 0], layers.id[:, 0])  # all points: no draw
    assert not np.allclose(other.id[:, 1:], layers.id[:, 1:])
    assert list(geometry.twonn_scaling(x[0], range_max=2).scale) == [2]
    assert list(geometry.twonn_scaling(x[0, :25]).scale) == [2, 4]  # subsets > n_min = 10 points
    few = geometry.twonn_scaling(x[0, :8])  # too few to decimate: all points only
    assert list(few.scale) == [2] and few.id[0] == geometry.twonn(x[0, :8])


def test_twonn_scaling_decimates_the_distinct_points(monkeypatch):
    # As DADApy, which removes identical points first: a layer whose last 100 of 400 points
    # repeat its first 100 is decimated into subsets of 300 / 2^i distinct points.
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, 400, 5))
    x[1, 300:] = x[1, :100]
    used = []
    twonn = geometry._twonn
    monkeypatch.setattr(
        geometry, "_twonn", lambda p, fraction: used.append(p.n_kept.tolist()) or twonn(p, fraction)
    )
    with pytest.warns(geometry.DuplicatePointsWarning):
        scaling = geometry.twonn_scaling(x, range_max=8)
    assert used[0] == [400, 300]  # all points
    assert used[1:3] == [[200, 150]] * 2  # n2 = 4: two subsets of half
    assert used[3:] == [[100, 75]] * 4  # n2 = 8: four subsets of a quarter
    assert np.isfinite(scaling.id).all()
    monkeypatch.setattr(geometry, "MEMORY_BUDGET", 1)  # one layer per chunk: the same draws
    with pytest.warns(geometry.DuplicatePointsWarning):
        assert np.array_equal(geometry.twonn_scaling(x, range_max=8).id, scaling.id)


def test_overlap_identical_and_independent():
    rng = np.random.default_rng(3)
    a = rng.normal(size=(1000, 30))
    assert geometry.neighbourhood_overlap(a, a.copy(), k=30) == 1.0
    rotated = _embed(a, 50, rng) * 3.0 + 1.0  # same neighbourhoods
    assert geometry.neighbourhood_overlap(a, rotated, k=30) == 1.0
    independent = geometry.neighbourhood_overlap(a, rng.normal(size=(1000, 30)), k=30)
    assert independent == pytest.approx(30 / 999, abs=0.01)
    per = geometry.neighbourhood_overlap(a, a, k=10, per_point=True)
    assert per.shape == (1000,) and (per == 1).all()


def test_label_overlap_clusters_and_chance():
    rng = np.random.default_rng(4)
    labels = np.repeat([0, 1, 2, 3], 100)
    clustered = rng.normal(size=(400, 8)) + 20 * np.eye(8)[labels]
    assert geometry.label_overlap(clustered, labels, k=10) == 1.0
    chance = geometry.label_overlap(rng.normal(size=(400, 8)), labels, k=10)
    assert chance == pytest.approx(0.25, abs=0.05)
    # Missing labels: those points are left out of the neighbour search.
    partial = labels.astype(object)
    partial[:50] = None
    per = geometry.label_overlap(clustered, partial, k=10, per_point=True)
    assert np.isnan(per[:50]).all() and (per[50:] == 1).all()


def test_information_imbalance_identical_and_asymmetric():
    rng = np.random.default_rng(5)
    a = rng.normal(size=(500, 3))
    ab, ba = geometry.information_imbalance(a, a * 2.0)
    assert ab == ba == pytest.approx(2 / 500)  # every nearest neighbour has rank 1
    # The full space predicts one of its coordinates, not the other way round.
    full_to_part, part_to_full = geometry.information_imbalance(a, a[:, :1])
    assert full_to_part < 0.3 < 0.6 < part_to_full
    ab, ba = geometry.information_imbalance(a, rng.normal(size=(500, 3)))
    assert ab == pytest.approx(1, abs=0.1) and ba == pytest.approx(1, abs=0.1)


def test_linear_cka():
    rng = np.random.default_rng(6)
    a = rng.normal(size=(200, 40))
    b = a[:, :10] @ rng.normal(size=(10, 30)) + 0.5 * rng.normal(size=(200, 30))
    ac, bc = a - a.mean(0), b - b.mean(0)
    feature_space = np.linalg.norm(bc.T @ ac) ** 2 / (
        np.linalg.norm(ac.T @ ac) * np.linalg.norm(bc.T @ bc)
    )
    assert geometry.linear_cka(a, b) == pytest.approx(feature_space, rel=1e-12)
    assert geometry.linear_cka(a, _embed(a, 60, rng) * 5 + 2) == pytest.approx(1, rel=1e-12)
    both = geometry.linear_cka([a, a], [b, a])  # per-layer lists; widths may differ
    assert both == pytest.approx([feature_space, 1.0], rel=1e-12)


def test_duplicates_are_dropped_with_a_warning():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(3, 200, 6))
    x[1, 10:14] = x[1, 3]  # layer 1: four extra copies of point 3
    x[2, 50] = x[2, 60]  # layer 2: one extra copy
    with pytest.warns(geometry.DuplicatePointsWarning, match=r"5 identical points.*layer 1: 4, "):
        p = geometry.pairwise(x, context="test")
    assert p.n_kept.tolist() == [200, 196, 199]
    assert not p.keep[1, 10:14].any() and p.keep[1, 3] and not p.keep[2, 60]
    with pytest.warns(geometry.DuplicatePointsWarning, match="4 identical"):
        dedup = geometry.twonn(x[1])
    assert dedup == pytest.approx(geometry.twonn(np.delete(x[1], range(10, 14), axis=0)))
    assert np.isfinite(geometry.gride(p).id).all()


def test_too_few_distinct_points_give_nan():
    x = np.zeros((2, 50, 4))
    x[1] = np.random.default_rng(8).normal(size=(50, 4))
    with (
        pytest.warns(geometry.DuplicatePointsWarning, match="49 identical"),
        pytest.warns(geometry.TooFewPointsWarning, match=r"layer\(s\) \[0\]"),
    ):
        ids = geometry.twonn(x)
    assert np.isnan(ids[0]) and np.isfinite(ids[1])


def test_float32_close_to_float64_and_pairwise_reuse():
    x = _layers(n_layers=2, n=400, dim=64, seed=9)
    p64 = geometry.pairwise(x)
    p32 = geometry.pairwise(x, dtype="float32")
    assert geometry.twonn(p32) == pytest.approx(geometry.twonn(p64), rel=1e-3)
    assert geometry.gride(p32).id == pytest.approx(geometry.gride(p64).id, rel=1e-3)
    # A Pairwise gives the same numbers as the arrays it was built from.
    assert np.array_equal(geometry.twonn(p64), geometry.twonn(x))
    assert np.array_equal(geometry.gride(p64).id, geometry.gride(x).id)


# --------------------------------------------------------------------------------------------
# Agreement with DADApy (the reference implementation)


def test_id_equals_dadapy(dadapy):
    x = _layers(n_layers=3, n=300, dim=20)
    ours_twonn = geometry.twonn(x)
    ours_gride = geometry.gride(x, range_max=64)
    for layer in range(3):
        ref = dadapy.IdEstimation(coordinates=x[layer])
        assert ours_twonn[layer] == pytest.approx(ref.compute_id_2NN(mu_fraction=0.9)[0], rel=1e-6)
        ref_id, ref_err, ref_scale = ref.return_id_scaling_gride(range_max=64, return_ranks=True)
        assert ours_gride.id[layer] == pytest.approx(ref_id, rel=1e-6)
        assert ours_gride.error[layer] == pytest.approx(ref_err, rel=1e-6)
        assert np.array_equal(ours_gride.scale, ref_scale)
    ml = dadapy.IdEstimation(coordinates=x[0]).compute_id_2NN(algorithm="ml", mu_fraction=1)[0]
    assert geometry.twonn(x[0], fraction=1.0) == pytest.approx(ml, rel=1e-12)


def test_id_with_duplicates_equals_dadapy_after_removal(dadapy):
    x = _layers(n_layers=1, n=300, dim=20, seed=1)[0]
    x = np.concatenate([x, x[:7]])
    ref = dadapy.IdEstimation(coordinates=x)
    ref.remove_identical_points()
    assert ref.N == 300
    with pytest.warns(geometry.DuplicatePointsWarning, match="7 identical"):
        assert geometry.twonn(x) == pytest.approx(ref.compute_id_2NN()[0], rel=1e-6)
    with pytest.warns(geometry.DuplicatePointsWarning, match="7 identical"):
        ours = geometry.gride(x, range_max=32).id
    assert ours == pytest.approx(ref.return_id_scaling_gride(range_max=32)[0], rel=1e-6)


@pytest.mark.filterwarnings("ignore:Subset size greater than the dataset size")
def test_overlaps_and_imbalance_equal_dadapy(dadapy):
    a = _layers(n_layers=2, n=250, dim=20, seed=2)
    b = _layers(n_layers=2, n=250, dim=12, seed=2) + 0.3 * np.random.default_rng(3).normal(
        size=(2, 250, 12)
    )
    labels = np.random.default_rng(4).integers(0, 3, size=250)
    labels[: 250 // 3] = 0  # unequal class sizes, so that weighting matters
    overlap = geometry.neighbourhood_overlap(a, b, k=30)
    per_point = geometry.neighbourhood_overlap(a, b, k=30, per_point=True)
    plain = geometry.label_overlap(a, labels, k=30)
    weighted = geometry.label_overlap(a, labels, k=30, weighted=True)
    imb1 = geometry.information_imbalance(a, b, k=1)
    imb3 = geometry.information_imbalance(a, b, k=3)
    for layer in range(2):
        mc = dadapy.MetricComparisons(coordinates=a[layer])
        ref = mc.return_data_overlap(coordinates=b[layer], k=30, use_cython=False, avg=False)
        assert np.array_equal(per_point[layer], ref)
        assert overlap[layer] == np.mean(ref)
        assert plain[layer] == mc.return_label_overlap(labels, k=30, weighted=False)
        assert weighted[layer] == mc.return_label_overlap(labels, k=30)
        for k, (ab, ba) in ((1, imb1), (3, imb3)):
            ref_ab, ref_ba = mc.return_information_imbalace(b[layer], k=k, subset_size=250)
            assert (ab[layer], ba[layer]) == (ref_ab[0], ref_ba[0])


def test_bench_runs_small_and_agrees(tmp_path, dadapy):
    out = tmp_path / "geometry.json"
    _bench().main(["--layers", "2", "--n", "200", "--dim", "32", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["speedup"] > 0
    assert result["agreement"]["overlap"]["exact"]
    assert result["agreement"]["gride_a"]["max_rel_diff"] < 1e-6
    assert result["agreement"]["twonn_b"]["max_rel_diff"] < 1e-6


def _dadapy_clustering(compiled: bool):
    """DADApy's Clustering class (ADP). Its compiled kernels (k*, PAk, ADP) are built against
    numpy < 2 and do not load under numpy 2; a folder of kernels rebuilt from DADApy's own .c
    files can be named by VLMLAYERS_DADAPY_CYTHON. ``compiled``: skip without them; otherwise
    stand-ins fill in and only DADApy's pure-Python ADP (``compute_clustering_ADP_pure_python``)
    can run."""
    import contextlib
    import importlib.machinery
    import io
    import os
    import types

    if importlib.util.find_spec("dadapy") is None:
        pytest.skip("dadapy not installed")
    _bench().import_dadapy()  # the dadapy package, without its __init__ where that fails
    package = sys.modules.get("dadapy._cython") or importlib.import_module("dadapy._cython")
    folders = [Path(importlib.util.find_spec("dadapy").submodule_search_locations[0]) / "_cython"]
    if os.environ.get("VLMLAYERS_DADAPY_CYTHON"):
        folders.insert(0, Path(os.environ["VLMLAYERS_DADAPY_CYTHON"]))
    kernels = ("cython_clustering", "cython_clustering_v2", "cython_density")
    kernels += ("cython_maximum_likelihood_opt", "cython_maximum_likelihood_opt_full")
    for name in kernels:
        full = f"dadapy._cython.{name}"
        module = sys.modules.get(full)
        if module is None or getattr(module, "_stand_in", False):
            for so in (f for folder in folders for f in sorted(folder.glob(f"{name}.*.so"))):
                loader = importlib.machinery.ExtensionFileLoader(full, str(so))
                spec = importlib.util.spec_from_file_location(full, so, loader=loader)
                try:
                    with contextlib.redirect_stderr(io.StringIO()):
                        module = importlib.util.module_from_spec(spec)
                        loader.exec_module(module)
                    break
                except ImportError:
                    module = None
            if module is None:
                module = types.ModuleType(full)
                module._stand_in = True
            sys.modules[full] = module
            setattr(package, name, module)
    clustering = importlib.import_module("dadapy.clustering")
    used = ("cython_clustering", "cython_density", "cython_maximum_likelihood_opt_full")
    if compiled and any(
        getattr(sys.modules[f"dadapy._cython.{n}"], "_stand_in", False) for n in used
    ):
        pytest.skip("DADApy's compiled ADP kernels do not load (numpy 2); see _dadapy_clustering")
    return clustering.Clustering


def _peaks_data(seed: int) -> np.ndarray:
    """(2, 600, 8): five Gaussian blobs of different widths; a bent 6-d cloud in 8-d."""
    rng = np.random.default_rng(seed)
    centres = 4 * rng.normal(size=(5, 8))
    blobs = np.concatenate([rng.uniform(0.5, 1.5) * rng.normal(size=(120, 8)) + c for c in centres])
    bent = np.tanh(rng.normal(size=(600, 6)) @ rng.normal(size=(6, 8)))
    return np.stack([blobs, bent])


@pytest.mark.filterwarnings("ignore:Careful! The intrinsic dimension")
def test_density_peaks_equal_dadapy_adp():
    """The whole of DADApy's compute_clustering_ADP (ID, k*, PAk, ADP) on the same points."""
    Clustering = _dadapy_clustering(compiled=True)
    x = _peaks_data(8)
    for z, halo in ((1.65, False), (1.65, True), (0.5, False)):
        ours = geometry.density_peaks(x, z=z, halo=halo)
        for layer in range(2):
            ref = Clustering(coordinates=x[layer])
            assert np.array_equal(ours[layer], ref.compute_clustering_ADP(Z=z, halo=halo))
            kstar = geometry._adp_kstar(
                ref.distances, ref.dist_indices, ref.intrinsic_dim, ref.maxk
            )
            assert np.array_equal(kstar, ref.kstar)
            log_den, error = geometry._pak(ref.distances, kstar, ref.intrinsic_dim)
            assert log_den == pytest.approx(ref.log_den, rel=1e-9)
            assert error == pytest.approx(ref.log_den_err, rel=1e-12)


@pytest.mark.filterwarnings("ignore:Careful! The intrinsic dimension")
def test_density_peak_merging_equals_dadapy_pure_python():
    """DADApy's pure-Python ADP, given our k* and PAk densities: the same clusters as ours. The
    near-copies (pairs 0.01 apart, ID ~0.2) reach the removed peaks with no labelled neighbour,
    where DADApy's compiled ADP reads its table one row off and ours follows the Python one."""
    Clustering = _dadapy_clustering(compiled=False)
    rng = np.random.default_rng(9)
    x = _peaks_data(9)
    base = np.tanh(rng.normal(size=(300, 8)) @ rng.normal(size=(8, 64)))
    near_copies = np.concatenate([base, base + 0.01 * rng.normal(size=base.shape)])
    cases = [(x[0], 1.65), (x[0], 0.5), (x[1], 1.65), (x[1], 0.5), (near_copies, 1.65)]
    for points, z in cases:
        ref = Clustering(coordinates=points)
        ref.compute_id_2NN()
        assert ref.intrinsic_dim == pytest.approx(geometry.twonn(points), rel=1e-9)
        kstar = geometry._adp_kstar(ref.distances, ref.dist_indices, ref.intrinsic_dim, ref.maxk)
        ref.kstar = kstar
        ref.log_den, ref.log_den_err = geometry._pak(ref.distances, kstar, ref.intrinsic_dim)
        expected = ref.compute_clustering_ADP_pure_python(Z=z)
        ours = geometry.density_peaks(points, z=z)
        assert np.array_equal(ours, expected) and ref.N_clusters == ours.max() + 1
        assert ours.min() == 0
    assert ref.intrinsic_dim < 0.5
    assert len(np.unique(geometry.density_peaks(x[0]))) > 1


# --------------------------------------------------------------------------------------------
# The stage


def _store(
    root: Path, per_layer: dict[int, np.ndarray], ids: list[str], tap: str = "residual"
) -> Path:
    for layer, x in per_layer.items():
        activations.write_shard(root, tap, layer, 0, ids[:60], {"last": x[:60]})
        activations.write_shard(root, tap, layer, 1, ids[60:], {"last": x[60:]})
    manifest = {"layers": sorted(per_layer), "n": len(ids), "dtype": "float32"}
    write_json(manifest, root / "manifest.json")
    return root


def test_stage_end_to_end(tmp_path):
    rng = np.random.default_rng(10)
    n = 120
    ids = [f"s{i:03d}" for i in range(n)]
    colour = np.repeat(["red", "green", "blue"], n // 3)
    question = np.tile(["what colour?", "what shape?"], n // 2)
    centres = {c: 30 * rng.normal(size=16) for c in ("red", "green", "blue")}
    image, text = {0: np.ones((n, 16))}, {0: np.ones((n, 16))}  # layer 0: one embedding for all
    for layer in (1, 2, 3):
        z = rng.normal(size=(n, 3)) @ rng.normal(size=(3, 16))
        image[layer] = np.stack([centres[c] for c in colour]) + z
        text[layer] = image[layer] if layer == 2 else rng.normal(size=(n, 16))
    labels = tmp_path / "data.parquet"
    pd.DataFrame(
        {"id": ids, "question": question, "labels.colour": colour, "labels.question_type": question}
    ).to_parquet(labels)
    stores = {m: _store(tmp_path / m, x, ids) for m, x in (("image", image), ("text", text))}
    for head, same in (("head.00", True), ("head.01", False)):  # head 0 agrees across forms
        for m, x in (("image", image), ("text", text)):
            _store(stores[m], {lay: (image if same else x)[lay] for lay in (1, 2, 3)}, ids, head)
    # per-prompt entropies of the image store (the text store has none: no rows for it)
    entropy = pd.DataFrame(
        [{"id": i, "tap": "residual", "layer": lay, "entropy": float(lay) + j / n}
         for lay in range(4) for j, i in enumerate(ids)]
    )  # fmt: skip
    entropy.to_parquet(stores["image"] / "prompt_entropy.parquet")
    out = tmp_path / "geometry.parquet"
    main(
        [
            "geometry", "--model", "tiny-tuned",
            "--image", str(stores["image"]), "--text", str(stores["text"]),
            "--labels", str(labels), "--poolings", "last", "--k", "5", "--heads",
            "--n-permutations", "19", "--gride-range-max", "16", "--twonn-range-max", "8",
            "--n-boot", "200",
            "--seed", "3", "--out", str(out),
        ]
    )  # fmt: skip
    table = pd.read_parquet(out)
    assert list(table.columns) == list(geometry.COLUMNS)
    heads = table[table.tap != "residual"]
    table = table[table.tap == "residual"]
    assert sorted(table.layer.unique()) == [1, 2, 3]  # layer 0 skipped for `last`
    assert set(table.modality) == {"image", "text", "image~text"}
    assert (table.model == "tiny-tuned").all() and (table.seed == 3).all()
    assert set(table.metric) == {
        "id_twonn", "id_gride", "label_overlap:colour", "baseline_overlap:question_type",
        "neighbour_overlap", "information_imbalance:image->text",
        "information_imbalance:text->image", "cka_linear", "svcca", "entropy", "prompt_entropy",
        "modality_cosine", "id_correlation", "id_correlation_p", "adp_homogeneity",
    }  # fmt: skip
    # the layer x head matrix: head 0 is the same in both forms, head 1 is not
    matrix = heads.pivot_table(index=["tap", "layer"], columns="metric", values="value")
    assert set(heads.metric) == {"neighbour_overlap", "cka_linear"} and len(matrix) == 6
    assert (matrix.loc["head.00", "neighbour_overlap"] == 1.0).all()
    assert matrix.loc["head.01"].loc[3, "neighbour_overlap"] < 0.3

    def row(layer, modality, metric, scale=None):
        hit = table[(table.layer == layer) & (table.modality == modality)]
        hit = hit[hit.metric == metric]
        if scale is not None:
            hit = hit[hit.scale == scale]
        assert len(hit) == 1, (layer, modality, metric, scale)
        return hit.iloc[0]

    same = row(2, "image~text", "neighbour_overlap", 5)
    assert same.value == 1.0 and same.ci_low == same.ci_high == 1.0 and same.n == n
    assert row(2, "image~text", "cka_linear").value == pytest.approx(1.0)
    assert np.isnan(row(2, "image~text", "cka_linear").scale)
    assert row(3, "image~text", "neighbour_overlap").value < 0.3
    colour_overlap = row(1, "image", "label_overlap:colour", 5)
    assert colour_overlap.value == 1.0 and colour_overlap.n == n
    chance = row(1, "text", "baseline_overlap:question_type")
    assert chance.ci_low <= chance.value <= chance.ci_high
    assert row(3, "image", "id_twonn", 2).relative_depth == 1.0
    assert row(1, "image", "id_twonn", 2).value == pytest.approx(3, rel=0.25)
    twonn = table[(table.metric == "id_twonn") & (table.layer == 1) & (table.modality == "image")]
    assert list(twonn.scale) == [2, 4, 8]  # all points, then subsets of 1/2 and 1/4 of them
    assert twonn.ci_low.iloc[1:].lt(twonn.value.iloc[1:]).all() and twonn.ci_low.isna().iloc[0]
    gride = table[(table.metric == "id_gride") & (table.layer == 1) & (table.modality == "image")]
    assert list(gride.scale) == [2, 4, 8, 16]
    assert (gride.ci_low < gride.value).all() and (gride.value < gride.ci_high).all()
    # identical image and text vectors at layer 2: no gap, full dependence; layer 3 unrelated
    assert row(2, "image~text", "modality_cosine").value == pytest.approx(1.0)
    assert row(2, "image~text", "svcca").value == pytest.approx(1.0)
    assert row(2, "image~text", "id_correlation_p").value == pytest.approx(1 / 20)
    assert row(3, "image~text", "id_correlation_p").value > 0.05
    assert (
        row(3, "image~text", "adp_homogeneity").value
        > row(2, "image~text", "adp_homogeneity").value
    )
    assert row(2, "image", "prompt_entropy").value == pytest.approx(2 + (n - 1) / (2 * n))
    assert "prompt_entropy" not in set(table[table.modality == "text"].metric)
    assert row(2, "image", "entropy").value == pytest.approx(geometry.matrix_entropy(image[2]))


def test_stage_keeps_layer_zero_on_request_as_nan(tmp_path):
    rng = np.random.default_rng(11)
    ids = [f"s{i:03d}" for i in range(80)]
    per_layer = {0: np.ones((80, 8)), 1: rng.normal(size=(80, 8))}
    out = tmp_path / "g.parquet"
    store = _store(tmp_path / "img", per_layer, ids)
    args = ["geometry", "--model", "m", "--image", str(store), "--k", "5",
            "--gride-range-max", "8", "--no-skip-layer-zero", "--out", str(out)]  # fmt: skip
    with (
        pytest.warns(geometry.DuplicatePointsWarning, match="79 identical points.*layer 0: 79"),
        pytest.warns(geometry.TooFewPointsWarning),
    ):
        main(args)
    table = pd.read_parquet(out)
    assert set(table.modality) == {"image"}
    assert set(table.metric) == {"id_twonn", "id_gride", "entropy"}
    ids_rows = table[table.metric != "entropy"]
    assert ids_rows[ids_rows.layer == 0].value.isna().all()
    assert ids_rows[ids_rows.layer == 0].n.eq(1).all()
    assert table.query("layer == 0 and metric == 'entropy'").value.item() == 0.0  # one point
    assert table[table.layer == 1].value.notna().all()
    with pytest.raises(FileNotFoundError, match=r"img/tap=post_mlp: no layer=NN"):
        main(args[:-2] + ["--tap", "post_mlp", "--out", str(out)])
    # --taps: every measure on another tap too (its layers 1..L), rows named by tap
    _store(store, {1: 2 * per_layer[1], 2: rng.normal(size=(80, 8))}, ids, "mlp_out")
    main(args[:-3] + ["--taps", "residual", "mlp_out", "--out", str(out)])
    table = pd.read_parquet(out)
    mlp = table[table.tap == "mlp_out"]
    assert sorted(mlp.layer.unique()) == [1, 2]
    assert set(mlp.metric) == {"id_twonn", "id_gride", "entropy"}
    assert mlp.relative_depth.max() == 1.0
    residual = table[(table.tap == "residual") & (table.layer == 1)].set_index(["metric", "scale"])
    same = mlp[mlp.layer == 1].set_index(["metric", "scale"])  # 2x the residual vectors
    assert same.value.to_numpy() == pytest.approx(residual.value.loc[same.index].to_numpy())


def test_matrix_entropy_is_log_rank_for_orthonormal_rows_and_zero_for_rank_one():
    rng = np.random.default_rng(4)
    rows = np.linalg.qr(rng.normal(size=(64, 20)))[0].T  # 20 orthonormal rows
    # centring leaves 19 equal directions: log(rank) = log 19
    assert geometry.matrix_entropy(rows) == pytest.approx(np.log(19))
    rank_one = rng.normal(size=(30, 1)) * rng.normal(size=8)
    assert geometry.matrix_entropy(rank_one) == pytest.approx(0.0, abs=1e-9)
    batched = geometry.matrix_entropy(np.stack([rows, 3 * rows]))
    assert batched == pytest.approx([np.log(19)] * 2)
    renyi2 = geometry.matrix_entropy(rows, alpha=2.0)  # equal eigenvalues: every order agrees
    assert renyi2 == pytest.approx(np.log(19))
    x = _layers(n_layers=3, n=80, dim=12, seed=4)
    for alpha in (1.0, 2.0):
        per_layer = [geometry.matrix_entropy(layer, alpha=alpha) for layer in x]
        assert geometry.matrix_entropy(x, alpha=alpha) == pytest.approx(per_layer, rel=1e-12)
        assert geometry.matrix_entropy(geometry.pairwise(x), alpha=alpha) == pytest.approx(
            per_layer, rel=1e-12
        )


def test_svcca_sees_through_invertible_maps_not_independent_data():
    rng = np.random.default_rng(5)
    a = rng.normal(size=(200, 12))
    mixed = a @ rng.normal(size=(12, 12))
    assert geometry.svcca(a, mixed) == pytest.approx(1.0)
    assert geometry.svcca(a, np.c_[mixed, rng.normal(size=(200, 3)) * 1e-3]) > 0.9  # other width
    independent = geometry.svcca(a, rng.normal(size=(200, 12)))
    assert independent < 0.4
    # batched over layers (lists of different widths too) and from a Pairwise: the same numbers
    other = rng.normal(size=(200, 12))
    both = geometry.svcca(np.stack([a, a]), np.stack([mixed, other]))
    assert both == pytest.approx([1.0, geometry.svcca(a, other)], rel=1e-10)
    pairs = geometry.pairwise(np.stack([a, a])), geometry.pairwise(np.stack([mixed, other]))
    assert geometry.svcca(*pairs) == pytest.approx(both, rel=1e-10)
    assert geometry.svcca([a], [np.c_[mixed, mixed]]) == pytest.approx([1.0])
    # only the top directions count: one dominant shared direction, the rest independent
    shared = rng.normal(size=(200, 1))
    x = np.c_[100 * shared, rng.normal(size=(200, 5))]
    y = np.c_[100 * shared, rng.normal(size=(200, 5))]
    assert geometry.svcca(x, y, variance=0.99) == pytest.approx(1.0)
    assert geometry.svcca(x, y, variance=1.0) < 0.5


def test_id_correlation_of_noisy_copies_and_of_independent_sets():
    rng = np.random.default_rng(6)
    latent = rng.normal(size=(300, 3))
    a = latent @ rng.normal(size=(3, 20)) + 0.01 * rng.normal(size=(300, 20))
    b = latent @ rng.normal(size=(3, 20)) + 0.01 * rng.normal(size=(300, 20))
    copies = geometry.id_correlation(a, b, n_permutations=30, seed=1)
    assert copies.corr > 0.7 and copies.p == pytest.approx(1 / 31)  # no permutation as low
    assert copies.corr == pytest.approx(
        (copies.id_a + copies.id_b - copies.id_joint) / max(copies.id_a, copies.id_b)
    )
    assert copies.id_joint < copies.id_a + copies.id_b and copies.n == 300
    other = rng.normal(size=(300, 3)) @ rng.normal(size=(3, 20))
    independent = geometry.id_correlation(a, other, n_permutations=30, seed=1)
    assert independent.p > 0.05 and abs(independent.corr) < 0.2
    # per layer, the same as one layer at a time; deterministic for a seed
    both = geometry.id_correlation(
        np.stack([a, a]), np.stack([b, other]), n_permutations=30, seed=1
    )
    assert both.corr == pytest.approx([copies.corr, independent.corr])
    assert both.p == pytest.approx([copies.p, independent.p])


def test_paired_cosine_and_density_peak_homogeneity():
    rng = np.random.default_rng(7)
    a = rng.normal(size=(100, 6))
    assert geometry.paired_cosine(a, a) == pytest.approx(1.0)
    assert geometry.paired_cosine(np.stack([a, -a]), np.stack([a, a])) == pytest.approx([1, -1])
    noisy = a + rng.normal(size=(100, 6))
    per = geometry.paired_cosine(a, noisy, per_point=True)
    cosine = (a * noisy).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(noisy, axis=1)
    assert per == pytest.approx(cosine, rel=1e-12)
    assert geometry.paired_cosine(a, noisy) == pytest.approx(np.median(cosine), rel=1e-12)

    def blob(centre, n):
        return rng.normal(size=(n, 5)) + centre

    apart = geometry.density_peaks(np.concatenate([blob(0, 120), blob(12, 120)]))
    assert len(set(apart[:120])) == len(set(apart[120:])) == 1 and apart[0] != apart[-1]
    assert geometry.adp_homogeneity(blob(0, 120), blob(12, 120)) == pytest.approx(1.0)
    mixed = [np.concatenate([blob(0, 60), blob(12, 60)]) for _ in range(2)]
    assert geometry.adp_homogeneity(*mixed) == pytest.approx(0.0, abs=0.05)
    # a copy of a point is clustered once, with its first copy's label
    points = np.concatenate([blob(0, 50), blob(12, 50)])
    with pytest.warns(geometry.DuplicatePointsWarning, match="2 identical"):
        labels = geometry.density_peaks(np.concatenate([points, points[[3, 70]]]))
    assert list(labels[-2:]) == [labels[3], labels[70]]
    assert np.array_equal(labels[:100], geometry.density_peaks(points))
