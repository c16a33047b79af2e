"""Layer-wise probes: planted signal, scikit-learn agreement, transfer, controls, the CLI."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from vlmlayers import activations, cli
from vlmlayers.io import write_json, write_parquet
from vlmlayers.probe import (
    check_split,
    control_codes,
    encode_labels,
    fit_logreg,
    probe_layers,
    sklearn_C,
    split_ids,
    standardiser,
)


def planted(n, dim, strengths, n_classes=3, seed=0, direction_seed=None):
    """X (L, n, D) noise plus class means scaled per layer; y (n,). Same ``direction_seed`` ->
    the same class directions (shared semantics across modalities)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, n)
    means = np.random.default_rng(direction_seed if direction_seed is not None else seed + 1)
    means = means.normal(size=(n_classes, dim))
    X = np.stack([rng.normal(size=(n, dim)) + s * means[y] for s in strengths])
    return X.astype(np.float32), y


def test_probe_finds_planted_signal_only_where_planted():
    strengths = [0, 0, 1.0, 1.0, 0, 0]
    X, y = planted(400, 24, strengths, seed=1)
    labels = pd.DataFrame({"shape": np.array(["circle", "square", "star"])[y]})
    train, test = split_ids(400, 0.25, seed=0)
    df = probe_layers({"image": X}, labels, train, test, seed=0, n_boot=200)
    assert len(df) == 6
    assert (df["modality_train"] == "image").all() and (df["modality_test"] == "image").all()
    acc = df["accuracy"].to_numpy()
    chance = df["chance"].iloc[0]
    assert 0.28 < chance < 0.45  # majority-class rate of a balanced 3-class label
    assert (acc[[2, 3]] >= 0.9).all(), acc
    assert (np.abs(acc[[0, 1, 4, 5]] - 1 / 3) <= 0.15).all(), acc
    # Controls sit at chance everywhere; selectivity is high only where the signal is.
    assert (np.abs(df["control"] - 1 / 3) <= 0.15).all(), df["control"]
    np.testing.assert_allclose(df["selectivity"], df["accuracy"] - df["control"])
    assert (df["selectivity"].to_numpy()[[2, 3]] >= 0.5).all()
    assert (df["ci_low"] <= df["accuracy"]).all() and (df["accuracy"] <= df["ci_high"]).all()
    assert (df["ci_high"] - df["ci_low"] < 0.3).all()
    assert (df["n"] == 100).all() and (df["n_train"] == 300).all() and df["converged"].all()


@pytest.mark.parametrize("n_classes", [2, 4])
@pytest.mark.parametrize("l2", [1e-1, 1e-3])
def test_solver_matches_sklearn(n_classes, l2):
    X, y = planted(300, 30, [0.0, 0.2, 0.5, 1.0], n_classes=n_classes, seed=2)
    train, test = split_ids(300, 0.25, seed=0)
    mean, scale = standardiser(torch.from_numpy(X), train)
    Z = ((torch.from_numpy(X) - mean) / scale).numpy()
    fit = fit_logreg(torch.from_numpy(Z[:, train]), torch.from_numpy(y[train]), n_classes, l2)
    assert fit.converged.all()
    ours = fit.predict(torch.from_numpy(Z[:, test]))[:, :, 0].numpy()
    # Same problem in float64 to tight tolerance: the weights themselves agree.
    fit64 = fit_logreg(
        torch.from_numpy(Z[:, train]).double(),
        torch.from_numpy(y[train]),
        n_classes,
        l2,
        tol=1e-8,
        max_iter=2000,
    )
    C = sklearn_C(l2, len(train), n_classes)
    for layer in range(len(Z)):
        ref = LogisticRegression(C=C, tol=1e-10, max_iter=10_000)
        ref.fit(Z[layer, train].astype(np.float64), y[train])
        acc_sk = (ref.predict(Z[layer, test]) == y[test]).mean()
        acc_ours = (ours[layer] == y[test]).mean()
        assert abs(acc_sk - acc_ours) <= 0.01, (layer, acc_sk, acc_ours)
        W = fit64.weight[layer, 0].numpy()
        b = fit64.bias[layer, 0].numpy()
        if n_classes == 2:  # scikit-learn's single vector is our class-1 minus class-0 row
            W, b = (W[1] - W[0])[None], np.array([b[1] - b[0]])
        np.testing.assert_allclose(W, ref.coef_, atol=1e-4 * max(1, np.abs(ref.coef_).max()))
        np.testing.assert_allclose(b, ref.intercept_, atol=1e-4 * max(1, np.abs(b).max()))


def test_solver_problems_are_independent_of_batching_and_masks():
    X, y = planted(200, 16, [0.3, 1.0, 0.0], n_classes=3, seed=3)
    y2 = (y + np.arange(200) % 2) % 3
    Y = np.stack([y, y2], axis=1)
    Y[::7, 1] = -1  # missing values of the second label
    kw = dict(n_classes=3, l2=1e-2, tol=1e-9, max_iter=1000)
    X64 = torch.from_numpy(X).double()
    together = fit_logreg(X64, torch.from_numpy(Y), **kw)
    alone = fit_logreg(X64[1:2], torch.from_numpy(Y[:, 0]), **kw)
    keep = Y[:, 1] >= 0
    subset = fit_logreg(X64[2:3, keep], torch.from_numpy(Y[keep, 1]), **kw)
    np.testing.assert_allclose(together.weight[1, 0], alone.weight[0, 0], atol=1e-6)
    np.testing.assert_allclose(together.weight[2, 1], subset.weight[0, 0], atol=1e-6)
    np.testing.assert_allclose(together.bias[2, 1], subset.bias[0, 0], atol=1e-6)


def test_fewer_classes_in_one_task_and_warm_start():
    X, y = planted(150, 10, [1.0, 0.5], n_classes=4, seed=4)
    Y = np.stack([y, y % 2], axis=1)  # 4 classes and 2 classes in one batch
    fit = fit_logreg(torch.from_numpy(X), torch.from_numpy(Y), [4, 2], l2=1e-2)
    assert fit.converged.all()
    assert torch.all(fit.weight[:, 1, 2:] == 0) and torch.all(fit.bias[:, 1, 2:] == 0)
    assert fit.predict(torch.from_numpy(X))[:, :, 1].max() <= 1
    again = fit_logreg(torch.from_numpy(X), torch.from_numpy(Y), [4, 2], l2=1e-2, init=fit)
    assert again.n_iter <= 2


def test_missing_class_in_training_split_names_label_and_class():
    labels = pd.DataFrame({"colour": ["red", "blue"] * 10 + ["mauve"]})
    codes, classes = encode_labels(labels)
    mauve = int(np.flatnonzero(labels["colour"] == "mauve")[0])
    train = np.array([i for i in range(21) if i != mauve])
    check_split(codes, classes, ["colour"], np.arange(21))  # every class seen: fine
    with pytest.raises(ValueError, match=r"label 'colour': class 'mauve' has no training sample"):
        check_split(codes, classes, ["colour"], train, seed=3)
    X = np.random.default_rng(0).normal(size=(2, 21, 4)).astype(np.float32)
    with pytest.raises(ValueError, match=r"'colour'.*'mauve'"):
        probe_layers({"image": X}, labels, train, np.array([mauve]), n_boot=10)


def test_missing_label_values_are_left_out_of_training_and_scoring():
    X, y = planted(200, 10, [1.5], seed=12)
    shape = np.array(["circle", "square", "star"], dtype=object)[y]
    shape[::4] = None
    train, test = split_ids(200, 0.25, seed=0)
    df = probe_layers({"image": X}, pd.DataFrame({"shape": shape}), train, test, n_boot=10)
    assert df["n"].iloc[0] == sum(1 for i in test if i % 4) < len(test)
    assert df["n_train"].iloc[0] == sum(1 for i in train if i % 4)
    assert df["accuracy"].iloc[0] > 0.9


def test_single_class_label_names_it():
    labels = pd.DataFrame({"shape": ["circle", "square"] * 3, "size": ["big"] * 6})
    with pytest.raises(ValueError, match=r"label 'size' has only class 'big'"):
        encode_labels(labels)


def test_standardisation_uses_training_rows_only():
    X, y = planted(100, 8, [1.0, 0.0], seed=5)
    train, test = split_ids(100, 0.25, seed=0)
    mean, scale = standardiser(torch.from_numpy(X), train)
    np.testing.assert_allclose(mean[:, 0].numpy(), X[:, train].mean(axis=1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(scale[:, 0].numpy(), X[:, train].std(axis=1), rtol=1e-5)
    # Whatever the test rows hold, nothing fitted on the training rows changes.
    poisoned = X.copy()
    poisoned[:, test] = 1e6
    labels = pd.DataFrame({"k": y})
    a = probe_layers({"image": X, "text": X}, labels, train, test, n_boot=10)
    b = probe_layers({"image": X, "text": poisoned}, labels, train, test, n_boot=10)
    same = (a["modality_train"] == "image") & (a["modality_test"] == "image")
    pd.testing.assert_frame_equal(a[same], b[same])
    assert (b.loc[b["modality_test"] == "text", "accuracy"] < 0.6).all()  # poisoned test rows


def test_control_codes_keep_class_balance_and_missing_values():
    codes = np.stack(
        [np.arange(40) % 4, np.where(np.arange(40) % 5 == 0, -1, np.arange(40) % 2)], 1
    )
    ctrl = control_codes(codes, seed=0)
    for k in range(2):
        np.testing.assert_array_equal(np.sort(ctrl[:, k]), np.sort(codes[:, k]))
    np.testing.assert_array_equal(ctrl[:, 1] == -1, codes[:, 1] == -1)
    assert (ctrl != codes).any()
    np.testing.assert_array_equal(ctrl, control_codes(codes, seed=0))


def test_cross_modal_transfer_needs_shared_directions():
    # Layer 0: both modalities carry the class along the same directions -> transfer works.
    # Layer 1: each modality has its own class directions -> within high, transfer near chance.
    n, dim = 300, 20
    text, y = planted(n, dim, [1.5, 1.5], seed=6, direction_seed=100)
    rng = np.random.default_rng(7)
    shared = np.random.default_rng(100).normal(size=(3, dim))
    own = np.random.default_rng(200).normal(size=(3, dim))
    image = np.stack([rng.normal(size=(n, dim)) + 1.5 * m[y] for m in (shared, own)])
    labels = pd.DataFrame({"shape": y})
    train, test = split_ids(n, 0.25, seed=0)
    df = probe_layers(
        {"image": image.astype(np.float32), "text": text}, labels, train, test, n_boot=50
    )
    acc = df.set_index(["modality_train", "modality_test", "layer"])["accuracy"]
    for pair in [("text", "text"), ("image", "image")]:
        assert acc[pair + (0,)] > 0.9 and acc[pair + (1,)] > 0.9
    for pair in [("text", "image"), ("image", "text")]:
        assert acc[pair + (0,)] > 0.9, acc
        assert acc[pair + (1,)] < 0.6, acc


def test_several_l2_values_are_chosen_per_layer():
    X, y = planted(200, 12, [0.0, 1.0], seed=8)
    train, test = split_ids(200, 0.25, seed=1)
    df = probe_layers(
        {"text": X}, pd.DataFrame({"k": y}), train, test, l2=[1e-3, 1e-1, 10.0], n_boot=10
    )
    assert set(df["l2"]).issubset({1e-3, 1e-1, 10.0})
    assert df.loc[df["layer"] == 1, "accuracy"].iloc[0] > 0.9


def _store(root, ids, per_layer, poolings, model="tiny"):
    for layer, X in enumerate(per_layer):
        pooled = {p: X + 0.01 * i for i, p in enumerate(poolings)}
        activations.write_shard(
            root, "residual", layer, 0, ids[:30], {p: v[:30] for p, v in pooled.items()}
        )
        activations.write_shard(
            root, "residual", layer, 1, ids[30:], {p: v[30:] for p, v in pooled.items()}
        )
    write_json(
        {"model": model, "layers": list(range(len(per_layer))), "n": len(ids)},
        root / "manifest.json",
    )


def test_cli_end_to_end(tmp_path):
    n, dim = 160, 12
    text, y = planted(n, dim, [0.0, 0.5, 1.5, 1.5], seed=9, direction_seed=50)
    # The image form carries the same classes along the same directions, at other depths.
    rng = np.random.default_rng(11)
    means = np.random.default_rng(50).normal(size=(3, dim))
    image = np.stack([rng.normal(size=(n, dim)) + s * means[y] for s in [0.0, 0.0, 1.5, 0.3]])
    ids = [f"s{i:03d}" for i in range(n)]
    _store(tmp_path / "image", ids, image.astype(np.float32), ["last", "mean_image"])
    _store(tmp_path / "text", ids, text, ["last", "mean_text"])
    order = rng.permutation(n)  # the dataset lists samples in another order, plus an extra one
    write_parquet(
        pd.DataFrame(
            {
                "id": [ids[i] for i in order] + ["extra"],
                "caption": "a caption",
                "labels.shape": [["circle", "square", "star"][y[i]] for i in order] + ["star"],
                "labels.parity": [i % 2 for i in order] + [0],
            }
        ),
        tmp_path / "data.parquet",
    )
    out = tmp_path / "probe.parquet"
    cli.main(
        [
            "probe",
            "--model",
            "tiny",
            "--image",
            str(tmp_path / "image"),
            "--text",
            str(tmp_path / "text"),
            "--labels",
            str(tmp_path / "data.parquet"),
            "--poolings",
            "last",
            "mean_image",
            "--seeds",
            "0",
            "1",
            "--n-boot",
            "50",
            "--out",
            str(out),
        ]
    )
    df = pd.read_parquet(out)
    expected = {
        "layer",
        "relative_depth",
        "model",
        "modality_train",
        "modality_test",
        "pooling",
        "label",
        "accuracy",
        "ci_low",
        "ci_high",
        "control",
        "selectivity",
        "chance",
        "n",
        "seed",
    }
    assert expected <= set(df.columns)
    assert set(df["seed"]) == {0, 1} and set(df["label"]) == {"shape", "parity"}
    assert (df["model"] == "tiny").all() and (df["n"] == 40).all()
    np.testing.assert_allclose(df["relative_depth"], df["layer"] / 3)
    pairs = set(zip(df["pooling"], df["modality_train"], df["modality_test"], strict=True))
    assert pairs == {
        ("last", "image", "image"),
        ("last", "text", "text"),
        ("last", "text", "image"),
        ("last", "image", "text"),
        ("mean_image", "image", "image"),
    }
    # 2 poolings' worth of conditions x 2 labels x 2 seeds x 4 layers
    assert len(df) == 5 * 2 * 2 * 4
    shape = df[(df["label"] == "shape") & (df["pooling"] == "last")]
    by = shape.groupby(["modality_train", "modality_test", "layer"])["accuracy"].mean()
    assert by[("text", "image", 2)] > 0.85  # shared directions at layer 2 transfer
    assert by[("text", "text", 0)] < 0.6 and by[("text", "image", 0)] < 0.6
    assert by[("text", "text", 3)] > 0.85 and by[("text", "image", 3)] < by[("text", "text", 3)]
    parity = df[df["label"] == "parity"]  # unrelated to the vectors: chance everywhere
    assert (parity["accuracy"] < 0.75).all()


def test_cli_options_layer_batches_and_label_subset(tmp_path):
    n, dim = 120, 8
    X, y = planted(n, dim, [0.0, 1.5, 1.5], seed=13)
    ids = [f"s{i:03d}" for i in range(n)]
    _store(tmp_path / "text", ids, X, ["last"])
    write_parquet(
        pd.DataFrame({"id": ids, "labels.shape": y, "labels.other": np.arange(n) % 3}),
        tmp_path / "data.parquet",
    )
    common = ["probe", "--model", "m", "--text", str(tmp_path / "text"), "--seeds", "3"]
    common += ["--labels", str(tmp_path / "data.parquet"), "--n-boot", "20"]
    base = common + ["--label", "shape"]
    with pytest.warns(UserWarning, match="pooling 'mean_image' is in no store"):
        cli.main(base + ["--poolings", "last", "mean_image", "--out", str(tmp_path / "a.parquet")])
    cli.main(base + ["--layer-batch", "1", "--out", str(tmp_path / "b.parquet")])
    cli.main(
        base + ["--layers", "1", "2", "--l2", "1e-3", "1", "--out", str(tmp_path / "c.parquet")]
    )
    a, b, c = (pd.read_parquet(tmp_path / f"{k}.parquet") for k in "abc")
    assert set(a["label"]) == {"shape"} and set(a["pooling"]) == {"last"}
    assert set(a["modality_train"]) == {"text"} and (a["seed"] == 3).all()
    pd.testing.assert_frame_equal(a, b)  # layers fitted one at a time: the same numbers
    assert list(c["layer"]) == [1, 2] and set(c["l2"]) <= {1e-3, 1.0}
    np.testing.assert_allclose(c["relative_depth"], [0.5, 1.0])
    with pytest.raises(ValueError, match=r"labels \['nope'\] not in"):
        cli.main(common + ["--label", "nope", "--out", str(tmp_path / "d.parquet")])
