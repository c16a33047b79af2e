"""Seaborn figures of the result tables, on relative depth (layer / number of layers).

``vlmlayers plot --figure KIND --table T.parquet [T2.parquet ...] --out FIG.png`` writes FIG.png
and FIG.svg (same stem). Tables of the same kind are concatenated (e.g. one per model). Kinds:

* ``probe``: probe accuracy by depth, one panel per label (columns) and train -> test modality
  (rows: image->image, text->text, text->image, image->text), one line per model, chance dotted;
* ``id``: intrinsic dimension by depth (TwoNN on all points; TwoNN by decimation and GRIDE at
  ``--scale``), one line per model and modality (image solid, text dashed);
* ``overlap``: image-text neighbourhood overlap by depth per model, the question-identity
  baseline (``baseline_overlap:*``, mean of the image and text prompts) dashed, and the gain
  tuned - aligned in a second panel;
* ``eval``: benchmark accuracy per model (x) and prompt form (image / text), one panel per task;
* ``intervention``: heatmap of the change in accuracy (``delta``) per window (x, relative depth of
  the window) and model x task (rows), one panel per intervention;
* ``finetune``: selective fine-tuning score vs training time per variant (layer band), panels
  per task (columns) and prompt form (rows);
* ``curve``: learning curves of every variant, accuracy (mean over tasks) by training step and by
  training seconds, one row per prompt form;
* ``similarity`` (``vlmlayers compare`` tables): model vs model similarity by depth, one panel
  per measure (neighbourhood overlap, linear CKA, SVCCA), one colour per pair ``A~B`` (in the
  order of the pair's roles), image prompts solid, text dashed;
* ``modality_gap``: image vs caption of the same sample by depth per model: median cosine
  (``modality_cosine``) and density-peak cluster homogeneity (``adp_homogeneity``);
* ``entropy``: matrix-based entropy by depth over the dataset (``entropy``) and within a prompt
  (``prompt_entropy``), per model and prompt form;
* ``heads``: heatmaps layer (rows, deepest on top) x head of the image-text neighbourhood overlap
  and linear CKA of each head's output (geometry rows with tap ``head.HH``), one column per model.

Depth profiles show the ``--tap`` rows (``residual``; a table without a ``tap`` column is all
residual stream), so per-head rows never mix into them.

Colours are fixed per model role (base grey, aligned blue, tuned orange, other variants green,
shades when a role has several models), per prompt modality (image vermilion, text sky blue) and
per fine-tuning variant, all from seaborn's "colorblind" palette. Bands are the tables'
``ci_low``/``ci_high``; rows of several seeds are averaged and their band is the envelope of the
seeds' intervals. The middle third of depth (``--thirds``) is shaded lightly. A table that is
empty or lacks the rows a figure needs gives a figure saying "not measured in this run" (with
why), never an error. Model roles come from the table's ``role`` column, else ``--roles
NAME=ROLE``, else the model name (see ``vlmlayers.claims.infer_role``). Files are written
atomically; SVG text stays text and the SVG bytes are reproducible.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Mapping
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from vlmlayers.claims import (  # noqa: E402
    NotMeasured,
    model_order,
    model_roles,
    parse_roles,
    read_tables,
    with_roles,
)
from vlmlayers.depth import THIRDS  # noqa: E402

CB = sns.color_palette("colorblind")
ROLE_COLOURS = {"base": CB[7], "aligned": CB[0], "tuned": CB[1], "variant": CB[2]}
MODALITY_COLOURS = {"image": CB[3], "text": CB[9]}
MODALITY_STYLES = {"image": ("-", "o"), "text": ("--", "s"), "image~text": ("-", "o")}
VARIANT_COLOURS = {
    "start": CB[0], "none": CB[0], "aligned": CB[0], "full": CB[1], "middle": CB[2],
    "early": CB[4], "late": CB[5], "complement": CB[6],
}  # fmt: skip
SPARE_COLOURS = [CB[8], CB[7], CB[9], CB[3]]
PAIR_COLOURS = [CB[4], CB[2], CB[5], CB[6], CB[8], CB[0], CB[1], CB[3]]
CONDITIONS = {
    ("image", "image"): "train image -> test image",
    ("text", "text"): "train text -> test text",
    ("text", "image"): "train text -> test image",
    ("image", "text"): "train image -> test text",
}
DEPTH_LABEL = "relative depth (layer / number of layers); shaded: middle third"
NOT_MEASURED = "not measured in this run"
FIGURES: dict[str, tuple[str, Callable]] = {}


def figure(name: str, title: str):
    """Register a figure kind: ``fn(table, args) -> Figure`` (raises NotMeasured when it can't)."""

    def register(fn):
        FIGURES[name] = (title, fn)
        return fn

    return register


# ---------------------------------------------------------------------------------------------
# Colours, aggregation, shared drawing


def _mix(colour, other, amount: float):
    return tuple((1 - amount) * a + amount * b for a, b in zip(colour, other, strict=True))


def model_palette(roles: Mapping[str, str]) -> dict[str, tuple]:
    """One colour per model: its role's colour, in shades when a role has several models."""
    palette = {}
    for role in {*roles.values()}:
        members = [m for m in model_order(roles) if roles[m] == role]
        base = ROLE_COLOURS.get(role, ROLE_COLOURS["variant"])
        if len(members) == 1:
            palette[members[0]] = base
            continue
        shades = sns.blend_palette(
            [_mix(base, (0, 0, 0), 0.35), base, _mix(base, (1, 1, 1), 0.45)], len(members)
        )
        palette.update(zip(members, shades, strict=True))
    return palette


def variant_order(names) -> list[str]:
    """Fine-tuning variants in the named bands' order (full, early, ...), then the rest sorted."""
    present = set(names)
    return [v for v in VARIANT_COLOURS if v in present] + sorted(present - set(VARIANT_COLOURS))


def variant_palette(variants) -> dict[str, tuple]:
    palette, spare = {}, iter(SPARE_COLOURS * 4)
    for name in variants:
        palette[name] = VARIANT_COLOURS.get(str(name).lower()) or next(spare)
    return palette


def aggregate(table: pd.DataFrame, keys: list[str], value: str = "value") -> pd.DataFrame:
    """Mean ``value`` per ``keys`` (over seeds and anything else); band = envelope of CIs."""
    rows = table.copy()
    for col in ("ci_low", "ci_high"):
        if col not in rows.columns:
            rows[col] = math.nan
    rows = rows[np.isfinite(rows[value].astype(float))]
    if rows.empty:
        raise NotMeasured(f"no finite {value} values")
    grouped = rows.groupby(keys, sort=True, dropna=False)
    out = grouped[value].mean().rename("value").to_frame()
    out["ci_low"] = grouped["ci_low"].min()
    out["ci_high"] = grouped["ci_high"].max()
    out["n_seeds"] = grouped["seed"].nunique() if "seed" in rows.columns else 1
    return out.reset_index()


def _need(table: pd.DataFrame, columns: list[str], what: str) -> None:
    if table is None or table.empty:
        raise NotMeasured(f"the {what} table is empty")
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise NotMeasured(f"the {what} table lacks column(s) {missing}")


def _pick(table: pd.DataFrame, column: str, value, what: str) -> pd.DataFrame:
    """Rows with ``column == value`` (a missing column keeps every row)."""
    if column not in table.columns or value is None:
        return table
    rows = table[table[column].astype(str) == str(value)]
    if rows.empty:
        have = sorted(table[column].astype(str).unique())
        raise NotMeasured(f"no {what} rows with {column} = {value} (have {have})")
    return rows


def _line(ax, rows: pd.DataFrame, colour, style=("-", "o"), label=None, band=True, lw=1.6):
    rows = rows.sort_values("relative_depth")
    x = rows["relative_depth"].to_numpy(float)
    ax.plot(
        x,
        rows["value"],
        linestyle=style[0],
        marker=style[1],
        markersize=3,
        color=colour,
        lw=lw,
        label=label,
    )
    lo, hi = rows["ci_low"].to_numpy(float), rows["ci_high"].to_numpy(float)
    ok = np.isfinite(lo) & np.isfinite(hi)
    if band and ok.sum() >= 2:
        ax.fill_between(x[ok], lo[ok], hi[ok], color=colour, alpha=0.18, lw=0)


def _thirds(ax, thirds=THIRDS) -> None:
    """Shade the middle third of depth (the axis label says so)."""
    a, b = thirds
    ax.axvspan(a, b, color="0.5", alpha=0.09, lw=0, zorder=0)
    ax.set_xlim(-0.03, 1.03)
    ax.set_xticks([0, 0.25, 0.5, 0.75, 1], ["0", "", "0.5", "", "1"])


def _legend(fig, handles: dict, title: str | None = None) -> None:
    fig.legend(
        list(handles.values()),
        list(handles.keys()),
        title=title,
        loc="outside right center",
        frameon=False,
        fontsize=8,
        title_fontsize=8,
    )


def _handle(colour, style=("-", "o"), lw=1.6):
    return plt.Line2D(
        [], [], color=colour, linestyle=style[0], marker=style[1], markersize=4, lw=lw
    )


def placeholder(title: str, reason: str) -> plt.Figure:
    """A readable figure saying the measurement is absent, and why."""
    fig, ax = plt.subplots(figsize=(6.4, 3.2))
    ax.set_axis_off()
    ax.text(
        0.5,
        0.62,
        NOT_MEASURED,
        ha="center",
        va="center",
        fontsize=16,
        color="0.3",
        transform=ax.transAxes,
    )
    ax.text(
        0.5,
        0.38,
        reason,
        ha="center",
        va="center",
        fontsize=9,
        color="0.45",
        wrap=True,
        transform=ax.transAxes,
    )
    fig.suptitle(title, fontsize=11)
    return fig


# ---------------------------------------------------------------------------------------------
# The figures


@figure("probe", "Linear probes: where can each attribute be read out?")
def plot_probe(table: pd.DataFrame, args) -> plt.Figure:
    cols = ["relative_depth", "model", "modality_train", "modality_test", "label", "accuracy"]
    _need(table, cols, "probe")
    rows = _pick(table, "pooling", args.pooling, "probe")
    if args.label:
        rows = rows[rows["label"].astype(str).isin(args.label)]
        if rows.empty:
            raise NotMeasured(f"no probe rows for label(s) {args.label}")
    rows = with_roles(rows, args.roles)
    rows["condition"] = [
        CONDITIONS.get((a, b), f"train {a} -> test {b}")
        for a, b in zip(rows["modality_train"], rows["modality_test"], strict=True)
    ]
    keys = ["label", "condition", "model", "relative_depth"]
    agg = aggregate(rows, keys, "accuracy")
    chance = rows.groupby(["label", "condition"])["chance"].mean() if "chance" in rows else None
    labels = sorted(agg["label"].unique())
    conditions = [c for c in CONDITIONS.values() if c in set(agg["condition"])]
    conditions += sorted(set(agg["condition"]) - set(conditions))
    roles = model_roles(rows)
    palette = model_palette(roles)
    fig, axes = plt.subplots(
        len(conditions),
        len(labels),
        figsize=(2.3 * len(labels) + 1.6, 1.9 * len(conditions) + 1),
        sharex=True,
        sharey=True,
        squeeze=False,
    )
    for i, condition in enumerate(conditions):
        for j, label in enumerate(labels):
            ax = axes[i, j]
            _thirds(ax, args.thirds)
            part = agg[(agg["label"] == label) & (agg["condition"] == condition)]
            for model in model_order(roles):
                _line(ax, part[part["model"] == model], palette[model])
            if chance is not None and np.isfinite(chance.get((label, condition), np.nan)):
                ax.axhline(chance[(label, condition)], color="0.3", ls=":", lw=1)
            if i == 0:
                ax.set_title(label, fontsize=9)
            if j == 0:
                ax.set_ylabel(condition.replace(" -> ", " ->\n"), fontsize=8)
    handles = {f"{m} ({roles[m]})": _handle(palette[m]) for m in model_order(roles)}
    handles["chance (majority class)"] = _handle("0.3", (":", ""), lw=1)
    _legend(fig, handles, "model")
    fig.suptitle(
        f"{args.title}\nheld-out probe accuracy by depth (pooling: {args.pooling}); "
        "band = 95% bootstrap CI",
        fontsize=10,
    )
    fig.supxlabel(DEPTH_LABEL, fontsize=9)
    return fig


def _id_rows(table: pd.DataFrame, scale: float) -> pd.DataFrame:
    """The ID rows shown, a ``panel`` each: TwoNN on all points (its smallest scale, n2 = 2),
    and TwoNN (by decimation) and GRIDE at the scale nearest ``scale``."""
    panels: dict[str, pd.DataFrame] = {}
    for metric, name, at in (
        ("id_twonn", "TwoNN", 2.0),
        ("id_twonn", "TwoNN", scale),
        ("id_gride", "GRIDE", scale),
    ):
        rows = table[table["metric"] == metric]
        if metric == "id_twonn":  # tables from before decimation: TwoNN on all points, no scale
            rows = rows.assign(scale=rows["scale"].fillna(2.0))
        scales = np.sort(rows["scale"].dropna().unique())
        if len(scales):
            chosen = scales[np.argmin(np.abs(scales - at))]
            all_points = metric == "id_twonn" and np.isclose(chosen, 2.0)
            panel = f"{name} ({'all points' if all_points else f'scale n2 = {chosen:g}'})"
            panels.setdefault(panel, rows[np.isclose(rows["scale"], chosen)].assign(panel=panel))
    if not panels:
        return table.iloc[:0].assign(panel="")
    return pd.concat(panels.values(), ignore_index=True)


def _tap(table: pd.DataFrame, args, what: str) -> pd.DataFrame:
    """Rows of the tap shown (``--tap``, residual by default); a table without a ``tap`` column is
    all residual stream, and rows with no tap are too."""
    if "tap" not in table.columns:
        return table
    return _pick(table.assign(tap=table["tap"].fillna("residual")), "tap", args.tap, what)


def _profiles(agg: pd.DataFrame, panels: Mapping[str, str], ylabels, roles, args) -> plt.Figure:
    """One panel per ``panel`` value of ``agg`` (title ``panels[value]``; y label ``ylabels``, or
    ``ylabels[value]``): a line per model (colour by role) and prompt form (image solid, text
    dashed; an ``image~text`` row is one line per model)."""
    names = [p for p in panels if p in set(agg["panel"])]
    palette = model_palette(roles)
    fig, axes = plt.subplots(1, len(names), figsize=(4.6 * len(names) + 1.8, 3.8), squeeze=False)
    forms = list(MODALITY_STYLES) + sorted(set(agg["modality"]) - set(MODALITY_STYLES))
    order = model_order(roles)
    # Each model's lines a little narrower than the one drawn before it, so that a later model
    # that did not change a profile (aligned's text prompts: stage 1 freezes the LM) leaves the
    # earlier line visible around its own.
    steps = np.linspace(3.2, 1.4, len(order)) if len(order) > 1 else np.full(len(order), 1.6)
    widths = dict(zip(order, steps, strict=True))
    handles = {}
    for ax, panel in zip(axes[0], names, strict=True):
        _thirds(ax, args.thirds)
        part = agg[agg["panel"] == panel]
        for model in order:
            for modality in forms:
                sel = part[(part["model"] == model) & (part["modality"] == modality)]
                if sel.empty:
                    continue
                style = MODALITY_STYLES.get(modality, ("-", "o"))
                _line(ax, sel, palette[model], style, lw=widths[model])
                form = f", {modality} prompts" if modality in ("image", "text") else ""
                handles[f"{model} ({roles[model]}){form}"] = _handle(
                    palette[model], style, widths[model]
                )
        ax.set_title(panels[panel], fontsize=10)
        ax.set_ylabel(ylabels if isinstance(ylabels, str) else ylabels[panel])
    fig.supxlabel(DEPTH_LABEL, fontsize=9)
    _legend(fig, handles, "model, input")
    return fig


@figure("id", "Intrinsic dimension across depth")
def plot_id(table: pd.DataFrame, args) -> plt.Figure:
    _need(table, ["relative_depth", "model", "modality", "metric", "scale", "value"], "geometry")
    rows = _tap(_pick(table, "pooling", args.pooling, "geometry"), args, "geometry")
    rows = rows[rows["modality"].isin(["image", "text"])]
    rows = _id_rows(rows, args.scale)
    if rows.empty:
        raise NotMeasured("no id_twonn / id_gride rows for image or text inputs")
    rows = with_roles(rows, args.roles)
    agg = aggregate(rows, ["panel", "model", "modality", "relative_depth"])
    panels = {panel: panel for panel in rows["panel"].unique()}
    fig = _profiles(agg, panels, "intrinsic dimension", model_roles(rows), args)
    fig.suptitle(
        f"{args.title} (pooling: {args.pooling}); higher = more dimensions in use", fontsize=11
    )
    return fig


@figure("overlap", "Image-text neighbourhood overlap across depth")
def plot_overlap(table: pd.DataFrame, args) -> plt.Figure:
    _need(table, ["relative_depth", "model", "modality", "metric", "value"], "geometry")
    rows = _tap(_pick(table, "pooling", args.pooling, "geometry"), args, "geometry")
    rows = with_roles(rows, args.roles)
    overlap = rows[(rows["metric"] == "neighbour_overlap") & (rows["modality"] == "image~text")]
    if overlap.empty:
        raise NotMeasured("no neighbour_overlap rows (modality image~text): both stores needed")
    baseline = rows[rows["metric"].astype(str).str.startswith("baseline_overlap:")]
    agg = aggregate(overlap, ["model", "relative_depth"])
    try:
        base = aggregate(baseline, ["model", "relative_depth"])
    except NotMeasured:
        base = None
    roles = model_roles(overlap)
    palette = model_palette(roles)
    by_role = {roles[m]: m for m in model_order(roles)}
    gain = "tuned" in by_role and "aligned" in by_role
    fig, axes = plt.subplots(1, 2 if gain else 1, figsize=(10.5 if gain else 6.2, 3.9))
    axes = np.atleast_1d(axes)
    ax = axes[0]
    _thirds(ax, args.thirds)
    handles = {}
    for model in model_order(roles):
        _line(ax, agg[agg["model"] == model], palette[model])
        handles[f"{model} ({roles[model]})"] = _handle(palette[model])
        if base is not None and (base["model"] == model).any():
            _line(ax, base[base["model"] == model], palette[model], ("--", ""), band=False, lw=1)
            handles[f"{model}: question-identity baseline"] = _handle(palette[model], ("--", ""), 1)
    ax.set_title("image vs text prompts of the same sample", fontsize=10)
    ax.set_ylabel("neighbourhood overlap (k nearest)")
    if gain:
        ax = axes[1]
        _thirds(ax, args.thirds)
        tuned = agg[agg["model"] == by_role["tuned"]].set_index("relative_depth")["value"]
        aligned = agg[agg["model"] == by_role["aligned"]].set_index("relative_depth")["value"]
        diff = (tuned - aligned).dropna().rename("value").reset_index()
        diff["ci_low"] = diff["ci_high"] = math.nan
        ax.axhline(0, color="0.3", lw=0.8)
        _line(ax, diff, ROLE_COLOURS["tuned"], band=False)
        ax.set_title(f"gain: {by_role['tuned']} - {by_role['aligned']}", fontsize=10)
        ax.set_ylabel("overlap gain from instruction tuning")
    fig.supxlabel(DEPTH_LABEL, fontsize=9)
    _legend(fig, handles, "model")
    fig.suptitle(f"{args.title} (pooling: {args.pooling}); band = 95% bootstrap CI", fontsize=11)
    return fig


SIMILARITY = {
    "neighbour_overlap": "neighbourhood overlap",
    "cka_linear": "linear CKA",
    "svcca": "SVCCA",
}


def _pair_models(rows: pd.DataFrame) -> dict[str, tuple[str, str]]:
    """{pair ("A~B"): (A, B)} from the ``model_a``/``model_b`` columns, else the name."""
    if {"model_a", "model_b"} <= set(rows.columns):
        named = rows.drop_duplicates("model")
        return {
            str(m): (str(a), str(b))
            for m, a, b in zip(named["model"], named["model_a"], named["model_b"], strict=True)
        }
    return {str(m): tuple(f"{m}~".split("~")[:2]) for m in set(rows["model"])}


def pair_palette(pairs: Mapping[str, tuple[str, str]], overrides=None) -> dict[str, tuple]:
    """One colour per compared pair, so a pair keeps its colour across runs: pairs ordered by
    their models' roles, latest first (tuned~aligned, tuned~base, aligned~base, then variants)."""
    names = pd.DataFrame({"model": sorted({m for pair in pairs.values() for m in pair})})
    roles = model_roles(names, overrides)
    rank = {r: i for i, r in enumerate(("tuned", "aligned", "base"))}

    def key(pair):
        return (*(rank.get(roles.get(m), len(rank)) for m in pairs[pair]), pair)

    order = sorted(pairs, key=key)
    colours = PAIR_COLOURS * (len(order) // len(PAIR_COLOURS) + 1)
    return dict(zip(order, colours, strict=False))


@figure("similarity", "Model vs model: representational similarity across depth")
def plot_similarity(table: pd.DataFrame, args) -> plt.Figure:
    _need(table, ["relative_depth", "model", "modality", "metric", "value"], "compare")
    rows = _tap(_pick(table, "pooling", args.pooling, "compare"), args, "compare")
    rows = rows[rows["metric"].isin(list(SIMILARITY))]
    if rows.empty:
        raise NotMeasured(f"no {' / '.join(SIMILARITY)} rows in the compare tables")
    rows = rows.assign(model=rows["model"].astype(str))
    agg = aggregate(rows, ["metric", "model", "modality", "relative_depth"])
    metrics = [m for m in SIMILARITY if m in set(agg["metric"])]
    pairs = _pair_models(rows)
    palette = pair_palette(pairs, args.roles)
    forms = list(MODALITY_STYLES) + sorted(set(agg["modality"]) - set(MODALITY_STYLES))
    fig, axes = plt.subplots(
        1, len(metrics), figsize=(4.2 * len(metrics) + 2.4, 3.8), sharey=True, squeeze=False
    )
    handles = {}
    for ax, metric in zip(axes[0], metrics, strict=True):
        _thirds(ax, args.thirds)
        part = agg[agg["metric"] == metric]
        for pair, (a, b) in ((p, pairs[p]) for p in palette):
            for modality in forms:
                sel = part[(part["model"] == pair) & (part["modality"] == modality)]
                if sel.empty:
                    continue
                style = MODALITY_STYLES.get(modality, ("-", "o"))
                _line(ax, sel, palette[pair], style)
                handles[f"{a} vs {b}, {modality} prompts"] = _handle(palette[pair], style)
        ax.axhline(1, color="0.3", ls=":", lw=0.8)
        scales = rows.loc[rows["metric"] == metric].get("scale", pd.Series()).dropna()
        k = f" (k = {scales.iloc[0]:g})" if metric == "neighbour_overlap" and len(scales) else ""
        ax.set_title(SIMILARITY[metric] + k, fontsize=10)
    axes[0, 0].set_ylabel("similarity of the two models (1 = alike)")
    fig.supxlabel(DEPTH_LABEL, fontsize=9)
    _legend(fig, handles, "models compared, input")
    fig.suptitle(
        f"{args.title}\nsame layer, same samples (pooling: {args.pooling}); "
        "band = 95% bootstrap CI",
        fontsize=10,
    )
    return fig


MODALITY_GAP = {
    "modality_cosine": ("median image-text cosine", "cosine (1 = no gap)"),
    "adp_homogeneity": (
        "homogeneity of density-peak clusters",
        "homogeneity (1 = one modality per cluster)",
    ),
}
ENTROPY = {
    "entropy": "over the dataset",
    "prompt_entropy": "within a prompt (mean over prompts)",
}


def _metric_rows(table: pd.DataFrame, metrics, modalities, args) -> pd.DataFrame:
    _need(table, ["relative_depth", "model", "modality", "metric", "value"], "geometry")
    rows = _tap(_pick(table, "pooling", args.pooling, "geometry"), args, "geometry")
    rows = rows[rows["metric"].isin(list(metrics)) & rows["modality"].isin(modalities)]
    if rows.empty:
        raise NotMeasured(
            f"no {' / '.join(metrics)} rows (modality {' or '.join(modalities)}) in the "
            "geometry tables"
        )
    return with_roles(rows.assign(panel=rows["metric"]), args.roles)


@figure("modality_gap", "Modality gap across depth: image vs caption of the same sample")
def plot_modality_gap(table: pd.DataFrame, args) -> plt.Figure:
    rows = _metric_rows(table, MODALITY_GAP, ["image~text"], args)
    agg = aggregate(rows, ["panel", "model", "modality", "relative_depth"])
    titles = {m: title for m, (title, _) in MODALITY_GAP.items()}
    ylabels = {m: label for m, (_, label) in MODALITY_GAP.items()}
    fig = _profiles(agg, titles, ylabels, model_roles(rows), args)
    fig.suptitle(
        f"{args.title} (pooling: {args.pooling}); aligned: high cosine, low homogeneity",
        fontsize=11,
    )
    return fig


@figure("entropy", "Matrix-based entropy across depth")
def plot_entropy(table: pd.DataFrame, args) -> plt.Figure:
    rows = _metric_rows(table, ENTROPY, ["image", "text"], args)
    agg = aggregate(rows, ["panel", "model", "modality", "relative_depth"])
    fig = _profiles(agg, ENTROPY, "matrix entropy (nats)", model_roles(rows), args)
    fig.suptitle(
        f"{args.title} (pooling: {args.pooling}); higher = spread over more directions",
        fontsize=11,
    )
    return fig


HEAD_METRICS = {
    "neighbour_overlap": "neighbourhood overlap",
    "cka_linear": "linear CKA",
    "linear_cka": "linear CKA",
}


def _head_number(tap: str):
    name = str(tap).split(".", 1)[1]
    return int(name) if name.isdigit() else name


@figure("heads", "Image-text similarity per attention head")
def plot_heads(table: pd.DataFrame, args) -> plt.Figure:
    _need(table, ["layer", "model", "modality", "metric", "value", "tap"], "geometry")
    rows = _pick(table, "pooling", args.pooling, "geometry")
    rows = rows[
        rows["tap"].astype(str).str.startswith("head.")
        & (rows["modality"] == "image~text")
        & rows["metric"].isin(list(HEAD_METRICS))
    ]
    if rows.empty:
        raise NotMeasured(
            "no per-head rows (tap head.HH, modality image~text, neighbour_overlap / cka_linear)"
            " in the geometry tables: heads were not extracted"
        )
    rows = with_roles(rows, args.roles).assign(
        head=rows["tap"].map(_head_number),
        panel=rows["metric"].map(HEAD_METRICS),
        relative_depth=rows.get("relative_depth", math.nan),
    )
    agg = aggregate(rows, ["panel", "model", "layer", "head"])
    depth = rows.groupby("layer")["relative_depth"].first()
    panels = list(dict.fromkeys(p for p in HEAD_METRICS.values() if p in set(agg["panel"])))
    roles = model_roles(rows)
    models = [m for m in model_order(roles) if m in set(agg["model"])]
    n_heads = agg["head"].nunique()
    n_layers = agg["layer"].nunique()
    fig, axes = plt.subplots(
        len(panels),
        len(models),
        figsize=(len(models) * (0.28 * n_heads + 2.2) + 1.2, len(panels) * (0.22 * n_layers + 1.6)),
        squeeze=False,
    )
    for i, panel in enumerate(panels):
        part = agg[agg["panel"] == panel]
        top = float(np.nanmax(part["value"])) or 1.0
        for j, model in enumerate(models):
            ax = axes[i, j]
            grid = part[part["model"] == model].pivot_table(
                index="layer", columns="head", values="value"
            )
            grid = grid.sort_index(ascending=False)  # deepest layer at the top
            sns.heatmap(
                grid,
                ax=ax,
                cmap="viridis",
                vmin=0,
                vmax=top,
                annot=grid.size <= 64,
                fmt=".2f",
                annot_kws={"fontsize": 6},
                cbar=j == len(models) - 1,
                cbar_kws={"label": panel},
            )
            ax.set_yticks(
                np.arange(len(grid.index)) + 0.5,
                [f"{layer} ({depth.get(layer, math.nan):.2f})" for layer in grid.index],
                fontsize=6,
                rotation=0,
            )
            ax.set_title(f"{model} ({roles[model]}): {panel}", fontsize=9)
            ax.set_xlabel("head" if i == len(panels) - 1 else "")
            ax.set_ylabel("layer (relative depth)" if j == 0 else "")
    fig.suptitle(
        f"{args.title} (pooling: {args.pooling}): image vs caption prompts of the same samples, "
        "each head's output",
        fontsize=11,
    )
    return fig


@figure("eval", "Benchmark accuracy per model and prompt form")
def plot_eval(table: pd.DataFrame, args) -> plt.Figure:
    _need(table, ["model", "modality", "task", "value"], "eval")
    rows = _pick(table, "metric", args.metric, "eval")
    rows = with_roles(_pick(rows, "subset", args.subset, "eval"), args.roles)
    agg = aggregate(rows, ["task", "model", "modality"])
    tasks = sorted(agg["task"].astype(str).unique())
    roles = model_roles(rows)
    models = model_order(roles)
    modalities = [m for m in ("image", "text") if m in set(agg["modality"])]
    modalities += sorted(set(agg["modality"]) - set(modalities))
    colours = {m: MODALITY_COLOURS.get(m, SPARE_COLOURS[i]) for i, m in enumerate(modalities)}
    width = 0.8 / len(modalities)
    fig, axes = plt.subplots(
        1,
        len(tasks),
        figsize=(0.9 * len(models) * len(tasks) + 2.8, 3.8),
        sharey=True,
        squeeze=False,
    )
    for ax, task in zip(axes[0], tasks, strict=True):
        part = agg[agg["task"].astype(str) == task].set_index(["model", "modality"])
        for k, modality in enumerate(modalities):
            x = np.arange(len(models)) + (k - (len(modalities) - 1) / 2) * width
            keys = [(m, modality) for m in models]
            got = part.reindex(keys)
            ax.bar(x, got["value"], width * 0.92, color=colours[modality], label=modality)
            lo, hi = got["ci_low"].to_numpy(float), got["ci_high"].to_numpy(float)
            y = got["value"].to_numpy(float)
            ok = np.isfinite(lo) & np.isfinite(hi) & np.isfinite(y)
            ax.errorbar(
                x[ok],
                y[ok],
                yerr=[y[ok] - lo[ok], hi[ok] - y[ok]],
                fmt="none",
                ecolor="0.2",
                capsize=2,
                lw=1,
            )
        ax.set_xticks(np.arange(len(models)), models, rotation=30, ha="right")
        for tick, model in zip(ax.get_xticklabels(), models, strict=True):
            tick.set_color(ROLE_COLOURS.get(roles[model], "0.2"))
        ax.set_ylim(0, 1.02)
        ax.set_title(f"{task} questions", fontsize=10)
        ax.set_xlabel("model (colour = role)")
    axes[0, 0].set_ylabel(f"{args.metric} (exact match)" if args.metric == "accuracy" else "")
    handles = {
        f"{m} prompt" if m in ("image", "text") else m: plt.Rectangle(
            (0, 0), 1, 1, color=colours[m]
        )
        for m in modalities
    }
    _legend(fig, handles, "input form")
    fig.suptitle(
        f"{args.title} (subset: {args.subset}); error bars = 95% bootstrap CI", fontsize=11
    )
    return fig


def intervention_label(row: pd.Series) -> str:
    """One sweep's panel title: the intervention and what sets it apart (queries, donor, mode)."""
    parts = [str(row["intervention"])]
    if isinstance(row.get("queries"), str):
        parts.append(f"{row['queries']} queries")
    if isinstance(row.get("donor"), str):
        parts.append(f"from {row['donor']}")
    if isinstance(row.get("mode"), str) and row["mode"] != "sliding":
        parts.append(row["mode"])
    return ", ".join(parts)


@figure("intervention", "Interventions: accuracy change per layer window")
def plot_intervention(table: pd.DataFrame, args) -> plt.Figure:
    _need(table, ["intervention", "relative_depth", "model", "task", "delta"], "intervention")
    rows = _pick(table, "metric", args.metric, "intervention")
    rows = _pick(rows, "subset", "all", "intervention")
    rows = with_roles(rows, args.roles)
    rows = rows[np.isfinite(rows["relative_depth"].astype(float))]  # not the baseline rows
    _need(rows, ["relative_depth"], "intervention (windows)")
    rows = rows.assign(
        relative_depth=rows["relative_depth"].astype(float).round(3),
        panel=rows.apply(intervention_label, axis=1),
    )
    agg = aggregate(rows, ["panel", "model", "task", "relative_depth"], "delta")
    panels = sorted(agg["panel"].unique())
    roles = model_roles(rows)
    order = {m: i for i, m in enumerate(model_order(roles))}
    agg["row"] = agg["model"] + " | " + agg["task"].astype(str)
    limit = float(np.nanmax(np.abs(agg["value"]))) or 1.0
    n_cols = min(3, len(panels))
    n_rows = -(-len(panels) // n_cols)
    widest = max(agg.loc[agg["panel"] == p, "relative_depth"].nunique() for p in panels)
    tallest = max(agg.loc[agg["panel"] == p, "row"].nunique() for p in panels)
    fig, axes = plt.subplots(
        n_rows,
        n_cols,
        figsize=(n_cols * (0.6 * widest + 2.6) + 1.0, n_rows * (0.45 * tallest + 1.6) + 0.8),
        squeeze=False,
    )
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    for i, (ax, name) in enumerate(zip(axes.flat, panels, strict=False)):
        part = agg[agg["panel"] == name]
        grid = part.pivot_table(index="row", columns="relative_depth", values="value")
        grid = grid.reindex(index=sorted(grid.index, key=lambda r: (order[r.split(" | ")[0]], r)))
        spans = (
            rows[rows["panel"] == name]
            .groupby("relative_depth")[["window_start", "window_end"]]
            .first()
        )
        sns.heatmap(
            grid,
            ax=ax,
            cmap="vlag",
            center=0,
            vmin=-limit,
            vmax=limit,
            annot=grid.size <= 240,
            fmt="+.2f",
            annot_kws={"fontsize": 7},
            linewidths=0.5,
            linecolor="white",
            cbar=i == len(panels) - 1,
            cbar_kws={"label": f"change in {args.metric} vs unmodified model"},
        )
        ax.set_xticklabels(
            [f"{d:.2f}\nL{spans.loc[d, 'window_start']}-{spans.loc[d, 'window_end']}"
             for d in grid.columns],
            fontsize=7,
            rotation=0,
        )  # fmt: skip
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("")
        ax.set_ylabel("model | task" if i % n_cols == 0 else "")
        ax.tick_params(axis="y", labelrotation=0)
    fig.supxlabel("layer window: its relative depth and its layers (L start-end)", fontsize=9)
    fig.suptitle(
        f"{args.title}: blue = the window matters (accuracy drops), red = accuracy rises",
        fontsize=11,
    )
    return fig


@figure("finetune", "Selective fine-tuning: score vs training time per layer band")
def plot_finetune(table: pd.DataFrame, args) -> plt.Figure:
    _need(table, ["variant", "task", "modality", "accuracy", args.time], "finetune")
    rows = _pick(table, "subset", args.subset, "finetune")
    if "comparison" not in rows.columns:
        rows = rows.assign(comparison="equal_steps")
    rows = rows[rows["comparison"] != "curve"]  # the learning curves have their own figure
    rows = rows.assign(
        variant=rows["variant"].astype(str),
        panel=rows["comparison"].astype(str).str.replace("_", " ") + ", " + rows["modality"],
    )
    keys = ["task", "panel", "variant"]
    agg = aggregate(rows, keys, "accuracy")
    times = rows.groupby(keys)[args.time].mean().rename("time")
    agg = agg.merge(times.reset_index(), on=keys)
    bands = {}  # legend detail: the trained blocks, else a band that is not the variant's name
    for variant, part in rows.groupby("variant"):
        first = part.iloc[0]
        if isinstance(first.get("layers"), str):
            bands[variant] = f" (blocks {first['layers']})"
        elif isinstance(first.get("band"), str) and first["band"] not in ("", variant):
            bands[variant] = f" ({first['band']})"
    variants = variant_order(agg["variant"])
    palette = variant_palette(variants)
    tasks = sorted(agg["task"].astype(str).unique())
    panels = sorted(agg["panel"].unique())  # comparison x prompt form
    fig, axes = plt.subplots(
        len(panels),
        len(tasks),
        figsize=(4.2 * len(tasks) + 2.4, 3.1 * len(panels) + 0.8),
        sharex=True,
        sharey=True,
        squeeze=False,
    )
    for i, panel in enumerate(panels):
        for j, task in enumerate(tasks):
            ax = axes[i, j]
            part = agg[(agg["panel"] == panel) & (agg["task"].astype(str) == task)]
            for variant in variants:
                sel = part[part["variant"] == variant]
                if sel.empty:
                    continue
                y, lo, hi = (sel[c].to_numpy(float) for c in ("value", "ci_low", "ci_high"))
                err = np.where(np.isfinite([y - lo, hi - y]), [y - lo, hi - y], 0.0)
                ax.errorbar(
                    sel["time"], y, yerr=err, fmt="o", color=palette[variant], capsize=2, ms=6
                )
                ax.annotate(
                    variant,
                    (float(sel["time"].iloc[0]), float(y[0])),
                    fontsize=7,
                    xytext=(4, 3),
                    textcoords="offset points",
                )
            ax.set_title(f"{task} questions; {panel} prompts", fontsize=9)
            if i == len(panels) - 1:
                ax.set_xlabel(f"training time ({args.time.replace('_', ' ')})")
            if j == 0:
                ax.set_ylabel("accuracy (exact match)")
    handles = {f"{v}{bands.get(v, '')}": _handle(palette[v], ("", "o")) for v in variants}
    _legend(fig, handles, "trained layers")
    fig.suptitle(
        f"{args.title}; up-left is better; error bars = 95% bootstrap CI (seed envelope)",
        fontsize=11,
    )
    return fig


@figure("curve", "Selective fine-tuning: learning curves in both prompt forms")
def plot_curve(table: pd.DataFrame, args) -> plt.Figure:
    _need(table, ["variant", "comparison", "step", "modality", "accuracy", args.time], "finetune")
    rows = _pick(table[table["comparison"] == "curve"], "subset", args.subset, "finetune")
    if rows.empty:
        raise NotMeasured("no learning-curve rows (finetune.snapshot_every: 0?)")
    rows = rows.assign(variant=rows["variant"].astype(str))
    keys = ["modality", "variant", "step"]
    agg = aggregate(rows, keys, "accuracy")
    agg = agg.merge(rows.groupby(keys)[args.time].mean().rename("time").reset_index(), on=keys)
    variants = variant_order(agg["variant"])
    palette = variant_palette(variants)
    forms = [m for m in ("image", "text") if m in set(agg["modality"])]
    fig, axes = plt.subplots(
        len(forms), 2, figsize=(11, 3.3 * len(forms) + 0.8), sharey="row", squeeze=False
    )
    for i, form in enumerate(forms):
        for j, (x, label) in enumerate((("step", "training step"), ("time", "training seconds"))):
            ax = axes[i, j]
            for variant in variants:
                sel = agg[(agg["modality"] == form) & (agg["variant"] == variant)]
                sel = sel.sort_values("step")
                if sel.empty:
                    continue
                ax.plot(sel[x], sel["value"], "o-", color=palette[variant], ms=4)
                ax.fill_between(
                    sel[x], sel["ci_low"], sel["ci_high"], color=palette[variant], alpha=0.12
                )
            ax.set_title(f"{form} prompts", fontsize=9)
            ax.set_xlabel(label)
            if j == 0:
                ax.set_ylabel("accuracy (mean over tasks)")
    _legend(fig, {v: _handle(palette[v], ("-", "o")) for v in variants}, "trained layers")
    fig.suptitle(f"{args.title}; bands = 95% bootstrap CI (seed envelope)", fontsize=11)
    return fig


# ---------------------------------------------------------------------------------------------
# Output and the stage


def render(kind: str, table: pd.DataFrame | None, args) -> plt.Figure:
    """The figure of ``kind``, or a "not measured" placeholder saying why."""
    title, fn = FIGURES[kind]
    sns.set_theme(context="paper", style="whitegrid", palette="colorblind")
    plt.rcParams.update(
        {"svg.fonttype": "none", "svg.hashsalt": "vlmlayers", "figure.constrained_layout.use": True}
    )
    if not getattr(args, "title", None):
        args.title = title
    try:
        return fn(table if table is not None else pd.DataFrame(), args)
    except NotMeasured as why:
        return placeholder(args.title, str(why))


def save(fig: plt.Figure, out: str | Path, dpi: int = 150) -> None:
    """Write ``out`` (PNG) and the SVG beside it, atomically; reproducible bytes for SVG."""
    from vlmlayers.io import atomic_path

    out = Path(out)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    with atomic_path(out.with_suffix(".svg")) as tmp:
        fig.savefig(tmp, format="svg", bbox_inches="tight", metadata={"Date": None})
    plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--figure", required=True, choices=sorted(FIGURES), help="figure kind")
    parser.add_argument(
        "--table",
        nargs="+",
        type=Path,
        required=True,
        metavar="PARQUET",
        help="input table(s) of the figure's kind, concatenated",
    )
    parser.add_argument("--out", type=Path, required=True, help="PNG path (SVG written beside)")
    parser.add_argument("--pooling", default="last", help="pooling shown (probe/id/overlap)")
    parser.add_argument(
        "--tap", default="residual", help="tap point shown by the depth profiles (residual)"
    )
    parser.add_argument(
        "--scale", type=float, default=32, help="ID scale n2, GRIDE's and TwoNN's (nearest; 32)"
    )
    parser.add_argument("--label", nargs="*", help="probe labels shown (default: all)")
    parser.add_argument("--subset", default="all", help="eval subset: all | seen | heldout")
    parser.add_argument("--metric", default="accuracy", help="eval/intervention metric")
    parser.add_argument(
        "--time",
        default="train_seconds",
        choices=["train_seconds", "step_seconds"],
        help="finetune x axis",
    )
    parser.add_argument(
        "--roles",
        nargs="*",
        default=[],
        metavar="NAME=ROLE",
        help="model roles for tables without a role column",
    )
    parser.add_argument(
        "--thirds",
        nargs=2,
        type=float,
        default=list(THIRDS),
        metavar=("LO", "HI"),
        help="bounds of the middle third shaded",
    )
    parser.add_argument("--title", help="figure title (default: the kind's)")
    parser.add_argument("--dpi", type=int, default=150)


def run(args: argparse.Namespace) -> None:
    args.roles = parse_roles(args.roles)
    table = read_tables(args.table)
    save(render(args.figure, table, args), args.out, dpi=args.dpi)
