"""Figures: every kind renders PNG + SVG from small synthetic tables, and from empty ones."""

from __future__ import annotations

import itertools
import re

import numpy as np
import pandas as pd
import pytest

from vlmlayers import cli
from vlmlayers.plots import FIGURES, NOT_MEASURED, model_palette, variant_palette

DEPTHS = np.arange(1, 7)  # 6 layers, layer 0 skipped as for the last pooling


def probe_table() -> pd.DataFrame:
    rows = []
    conditions = [("image", "image"), ("text", "text"), ("text", "image")]
    for model, (mtr, mte), label, seed, layer in itertools.product(
        ["aligned", "tuned"], conditions, ["colour", "shape"], [0, 1], DEPTHS
    ):
        acc = 0.3 + 0.1 * layer / 6 + (0.2 if model == "tuned" else 0) + 0.01 * seed
        rows.append(
            {"layer": layer, "relative_depth": layer / 6, "model": model, "modality_train": mtr,
             "modality_test": mte, "pooling": "last", "label": label, "accuracy": acc,
             "ci_low": acc - 0.05, "ci_high": acc + 0.05, "control": 0.25,
             "selectivity": acc - 0.25, "chance": 0.25, "n": 50, "seed": seed, "value": acc}
        )  # fmt: skip
    return pd.DataFrame(rows)


def geometry_table() -> pd.DataFrame:
    rows = []

    def add(model, modality, metric, scale, value, ci=0.02):
        for layer in DEPTHS:
            v = value(layer)
            rows.append(
                {"layer": layer, "relative_depth": layer / 6, "model": model,
                 "modality": modality, "pooling": "last", "metric": metric, "scale": scale,
                 "value": v, "ci_low": v - ci, "ci_high": v + ci, "n": 100, "seed": 0}
            )  # fmt: skip

    for model in ("base", "aligned", "tuned"):
        modalities = ["text"] if model == "base" else ["image", "text"]
        for modality in modalities:
            add(model, modality, "id_twonn", 2.0, lambda layer: 3 + np.sin(layer), ci=np.nan)
            for scale in (4.0, 32.0):
                add(model, modality, "id_twonn", scale, lambda layer: 3 + np.cos(layer))
            for scale in (16.0, 32.0):
                add(model, modality, "id_gride", scale, lambda layer: 4 + np.sin(layer / 2))
            add(model, modality, "baseline_overlap:question_type", 30.0, lambda layer: 0.3)
        if model != "base":
            gain = 0.1 if model == "tuned" else 0.0
            add(model, "image~text", "neighbour_overlap", 30.0, lambda layer, g=gain: 0.1 + g)
    return pd.DataFrame(rows)


def geometry_table_new() -> pd.DataFrame:
    """``geometry_table`` with a tap column and the newer measures: entropies per modality, the
    modality gap (image~text) and per-head rows (tap head.HH) whose values would stand out."""
    table = geometry_table().assign(tap="residual")
    rows = []

    def add(model, modality, metric, value, tap="residual", layers=DEPTHS, scale=np.nan):
        for layer in layers:
            v = value(layer)
            rows.append(
                {"layer": layer, "relative_depth": layer / 6, "model": model,
                 "modality": modality, "pooling": "last", "tap": tap, "metric": metric,
                 "scale": scale, "value": v, "ci_low": v - 0.01, "ci_high": v + 0.01,
                 "n": 100, "seed": 0}
            )  # fmt: skip

    for model in ("base", "aligned", "tuned"):
        for modality in ["text"] if model == "base" else ["image", "text"]:
            add(model, modality, "entropy", lambda layer: 2 + np.sin(layer))
            add(model, modality, "prompt_entropy", lambda layer: 1 + 0.1 * layer)
        if model == "base":
            continue
        add(model, "image~text", "modality_cosine", lambda layer: 0.2 + 0.05 * layer)
        add(model, "image~text", "adp_homogeneity", lambda layer: 0.9 - 0.1 * layer)
        for head in range(4):
            tap = f"head.{head:02d}"
            add(model, "image~text", "neighbour_overlap", lambda layer: 0.9, tap, scale=30.0)
            add(model, "image~text", "cka_linear", lambda layer, h=head: 0.1 * h + 0.05, tap)
    return pd.concat([table, pd.DataFrame(rows)], ignore_index=True)


def compare_table() -> pd.DataFrame:
    """As ``vlmlayers compare`` writes it, three pairs in one table (the figure reads them all)."""
    rows = []
    pairs = {("tuned", "aligned"): ["image", "text"], ("aligned", "base"): ["text"],
             ("tuned", "base"): ["text"]}  # fmt: skip
    for ((a, b), forms), metric, layer in itertools.product(
        pairs.items(), ["neighbour_overlap", "cka_linear", "svcca"], DEPTHS
    ):
        for modality in forms:
            v = 1.0 if (a, b) == ("aligned", "base") else 0.9 - 0.05 * layer
            ci = 0.03 if metric == "neighbour_overlap" else np.nan
            rows.append(
                {"layer": layer, "relative_depth": layer / 6, "model": f"{a}~{b}",
                 "model_a": a, "model_b": b, "modality": modality, "pooling": "last",
                 "tap": "residual", "metric": metric,
                 "scale": {"neighbour_overlap": 30.0, "svcca": 0.99}.get(metric, np.nan),
                 "value": v, "ci_low": v - ci, "ci_high": v + ci, "n": 100, "seed": 0}
            )  # fmt: skip
    return pd.DataFrame(rows)


def eval_table() -> pd.DataFrame:
    rows = []
    for (model, role), modality, task, subset in itertools.product(
        [("base", "base"), ("aligned", "aligned"), ("tuned", "tuned"), ("ft-middle", "variant")],
        ["image", "text"], ["vision", "knowledge"], ["all", "seen"],
    ):  # fmt: skip
        if role == "base" and modality == "image":
            continue
        for metric, v in (("accuracy", 0.5), ("answer_logprob", -1.0)):
            rows.append(
                {"model": model, "role": role, "modality": modality, "task": task,
                 "subset": subset, "metric": metric, "value": v, "ci_low": v - 0.1,
                 "ci_high": v + 0.1, "n": 40, "seed": 0}
            )  # fmt: skip
    return pd.DataFrame(rows)


def intervention_table() -> pd.DataFrame:
    """As ``vlmlayers intervene`` writes it: baseline rows (window -1), then one row per window."""
    sweeps = [
        ("knockout", "text", None, "sliding"),
        ("knockout", "last", None, "sliding"),
        ("transplant", None, "tuned", "sliding"),
        ("transplant", None, "tuned", "cumulative-top"),
    ]
    rows = []
    for (name, queries, donor, mode), model, task, subset, start in itertools.product(
        sweeps, ["aligned", "tuned"], ["vision", "knowledge"], ["all", "seen"], [-1, 0, 2, 4]
    ):
        delta = 0.0 if start < 0 else (-0.2 if start == 2 else 0.01)
        rows.append(
            {"intervention": name, "window_start": start, "window_end": start + 1 if start >= 0
             else -1, "relative_depth": (start + 0.5) / 6 if start >= 0 else np.nan,
             "model": model, "modality": "image", "task": task, "subset": subset,
             "metric": "accuracy", "value": 0.6 + delta, "baseline": 0.6, "delta": delta,
             "ci_low": 0.55 + delta, "ci_high": 0.65 + delta, "n": 40, "seed": 0,
             "mode": mode, "queries": queries, "donor": donor}
        )  # fmt: skip
    return pd.DataFrame(rows)


def test_intervention_panels_tell_sweeps_apart(tmp_path):
    svg = draw(tmp_path, "intervention", intervention_table())
    for title in (
        "knockout, text queries",
        "knockout, last queries",
        "transplant, from tuned",
        "transplant, from tuned, cumulative-top",
    ):
        assert title in svg
    assert "L2-3" in svg and "L-1--1" not in svg  # window columns, no baseline column


def finetune_table() -> pd.DataFrame:
    """As ``vlmlayers finetune table`` writes it (both comparisons and the learning curves)."""
    rows = []
    variants = {"full": ("0,1,2,3,4,5", 10.0), "middle": ("2,3", 6.0), "early": ("0,1", 5.0)}
    for (variant, (layers, secs)), seed, task, modality, (comparison, step) in itertools.product(
        variants.items(), [0, 1], ["vision", "knowledge"], ["image", "text"],
        [("equal_steps", 100), ("equal_time", 100), ("curve", 50), ("curve", 100)],
    ):  # fmt: skip
        acc = 0.8 - (0.02 if variant == "middle" else 0.0) - 0.1 * (variant == "early")
        acc -= 0.1 * (step == 50)
        rows.append(
            {"variant": variant, "band": variant, "layers": layers, "seed": seed,
             "comparison": comparison, "step": step, "trainable_params": 1000,
             "train_seconds": secs * step, "step_seconds": secs / 10, "peak_mem_mb": 500.0,
             "task": task, "modality": modality, "subset": "all", "accuracy": acc,
             "ci_low": acc - 0.04, "ci_high": acc + 0.04}
        )  # fmt: skip
    return pd.DataFrame(rows)


TABLES = {
    "probe": probe_table,
    "id": geometry_table,
    "overlap": geometry_table,
    "eval": eval_table,
    "intervention": intervention_table,
    "finetune": finetune_table,
    "curve": finetune_table,
    "similarity": compare_table,
    "modality_gap": geometry_table_new,
    "entropy": geometry_table_new,
    "heads": geometry_table_new,
}
DEPTH_FIGURES = ("probe", "id", "overlap", "similarity", "modality_gap", "entropy")


def test_every_figure_kind_has_a_synthetic_table():
    assert set(TABLES) == set(FIGURES)


def draw(tmp_path, kind: str, table: pd.DataFrame, *extra: str):
    src = tmp_path / f"{kind}.parquet"
    table.to_parquet(src, index=False)
    out = tmp_path / "fig" / f"{kind}.png"
    cli.main(["plot", "--figure", kind, "--table", str(src), "--out", str(out), *extra])
    svg = out.with_suffix(".svg")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.stat().st_size > 5000
    text = svg.read_text()
    assert text.lstrip().startswith("<?xml") and "<svg" in text
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp left
    return text


@pytest.mark.parametrize("kind", sorted(TABLES))
def test_figure_from_synthetic_table(tmp_path, kind):
    svg = draw(tmp_path, kind, TABLES[kind]())
    assert NOT_MEASURED not in svg
    if kind in DEPTH_FIGURES or kind == "heads":
        assert "relative depth" in svg


@pytest.mark.parametrize("kind", sorted(TABLES))
def test_figure_from_empty_table_says_not_measured(tmp_path, kind):
    empty = TABLES[kind]().iloc[:0]
    svg = draw(tmp_path, kind, empty)
    assert NOT_MEASURED in svg


def test_figure_without_the_needed_rows_says_why(tmp_path):
    geometry = geometry_table()
    svg = draw(tmp_path, "overlap", geometry[geometry["metric"] != "neighbour_overlap"])
    assert NOT_MEASURED in svg and "neighbour_overlap" in svg
    svg = draw(tmp_path, "probe", probe_table(), "--pooling", "mean_image")
    assert NOT_MEASURED in svg and "mean_image" in svg
    svg = draw(tmp_path, "id", geometry.assign(value=np.nan))
    assert NOT_MEASURED in svg and "finite" in svg


def test_id_figure_shows_twonn_on_all_points_and_both_estimators_at_the_scale(tmp_path):
    geometry = geometry_table()
    svg = draw(tmp_path, "id", geometry)
    for title in ("TwoNN (all points)", "TwoNN (scale n2 = 32)", "GRIDE (scale n2 = 32)"):
        assert title in svg
    svg = draw(tmp_path, "id", geometry, "--scale", "16")  # the nearest of each estimator
    assert "TwoNN (scale n2 = 4)" in svg and "GRIDE (scale n2 = 16)" in svg
    twonn = geometry["metric"] == "id_twonn"
    svg = draw(tmp_path, "id", geometry[~twonn | (geometry["scale"] == 2)])  # all points only
    assert "TwoNN (all points)" in svg and "TwoNN (scale" not in svg
    older = geometry[~twonn | (geometry["scale"] == 2)].copy()  # written before decimation
    older.loc[older["metric"] == "id_twonn", "scale"] = np.nan
    assert "TwoNN (all points)" in draw(tmp_path, "id", older)
    svg = draw(tmp_path, "id", geometry[~twonn | (geometry["scale"] == 4)])  # no all-points row
    assert "TwoNN (scale n2 = 4)" in svg and "all points" not in svg


def test_a_profile_equal_to_an_earlier_models_stays_visible(tmp_path):
    """base and aligned have the same text profiles here (as stage 1 freezes the LM): each
    line that lies on another is drawn narrower than it, so both show."""
    svg = draw(tmp_path, "id", geometry_table())
    widths: dict[tuple[str, bool], list[str]] = {}  # (points, dashed) -> widths drawn
    for path, style in re.findall(r'<path d="([^"]+)"[^>]*style="([^"]*stroke-width[^"]*)"', svg):
        width = re.search(r"stroke-width: ([\d.]+)", style).group(1)
        widths.setdefault((path, "stroke-dasharray" in style), []).append(width)
    overlaid = [w for w in widths.values() if len(w) > 1]
    assert overlaid  # base's and aligned's text lines, in each panel
    assert all(len(set(w)) == len(w) for w in overlaid)


def test_colours_follow_roles_and_are_distinct():
    roles = {"base": "base", "aligned": "aligned", "tuned": "tuned", "v1": "variant"}
    palette = model_palette(roles)
    assert len({palette[m] for m in roles}) == 4
    two = model_palette({"llava-a": "tuned", "llava-b": "tuned", "aligned": "aligned"})
    assert two["llava-a"] != two["llava-b"] and two["aligned"] == palette["aligned"]
    variants = variant_palette(["full", "middle", "odd-one"])
    assert variants["full"] == palette["tuned"] and len(set(variants.values())) == 3


def test_similarity_figure_names_pairs_and_measures(tmp_path):
    svg = draw(tmp_path, "similarity", compare_table())
    for text in ("tuned vs aligned, image prompts", "tuned vs aligned, text prompts",
                 "aligned vs base, text prompts", "tuned vs base, text prompts",
                 "neighbourhood overlap (k = 30)", "linear CKA", "SVCCA"):  # fmt: skip
        assert text in svg
    # A table of older runs without SVCCA and without the tap/model_a/model_b columns still plots.
    old = compare_table().drop(columns=["tap", "model_a", "model_b"])
    svg = draw(tmp_path, "similarity", old[old["metric"] != "svcca"])
    assert NOT_MEASURED not in svg and "SVCCA" not in svg and "tuned vs aligned" in svg


def test_new_geometry_figures_without_their_rows_say_which(tmp_path):
    """A geometry table from before these measures (no tap column, no entropy / gap / heads)."""
    for kind, names in (
        ("modality_gap", ["modality_cosine", "adp_homogeneity"]),
        ("entropy", ["entropy", "prompt_entropy"]),
        ("heads", ["tap"]),
    ):
        svg = draw(tmp_path, kind, geometry_table())
        assert NOT_MEASURED in svg and all(name in svg for name in names), kind
    no_heads = geometry_table_new()
    no_heads = no_heads[~no_heads["tap"].str.startswith("head.")]
    svg = draw(tmp_path, "heads", no_heads)
    assert NOT_MEASURED in svg and "heads were not extracted" in svg
    svg = draw(tmp_path, "similarity", compare_table(), "--pooling", "mean_text")
    assert NOT_MEASURED in svg and "mean_text" in svg


def test_depth_profiles_show_the_residual_tap_only(tmp_path):
    table = geometry_table_new()
    svg = draw(tmp_path, "heads", table)
    for text in ("aligned (aligned): neighbourhood overlap", "tuned (tuned): linear CKA",
                 "layer (relative depth)", "head"):  # fmt: skip
        assert text in svg
    heads_only = table[table["tap"].str.startswith("head.")]
    svg = draw(tmp_path, "overlap", heads_only)
    assert NOT_MEASURED in svg and "tap = residual" in svg
    svg = draw(tmp_path, "overlap", heads_only, "--tap", "head.01")
    assert NOT_MEASURED not in svg
    svg = draw(tmp_path, "modality_gap", table)
    assert "median image-text cosine" in svg and "tuned (tuned)" in svg
    svg = draw(tmp_path, "entropy", table)
    assert "base (base), text prompts" in svg and "within a prompt" in svg


def test_learning_curves_show_both_forms_by_step_and_by_seconds(tmp_path):
    svg = draw(tmp_path, "curve", finetune_table())
    for text in ("image prompts", "text prompts", "training step", "training seconds", "middle"):
        assert text in svg
    no_curve = finetune_table().query("comparison != 'curve'")
    assert "not measured in this run" in draw(tmp_path, "curve", no_curve)
    assert "curve" not in draw(tmp_path, "finetune", finetune_table())  # not a finetune panel
