"""Verdicts on the study's four claims from the result tables, by criteria read from the config.

Each claim of DESIGN.md ("The four claims") is judged by one or more *tests*; a test picks rows of
one result table (``--geometry``, ``--probe``, ``--eval``, ``--intervention``, ``--finetune``),
averages them per model and relative depth, and applies one *statistic* from a small registry.
Every test gives ``supported``, ``not supported`` or ``not measured`` (its table is absent or
empty, or lacks the rows it needs); a claim combines its tests with ``require: all`` (default:
any ``not supported`` -> not supported, else any ``not measured`` -> not measured) or
``require: any`` (any ``supported`` -> supported, else any ``not measured`` -> not measured).
A claim without criteria is ``not measured``. Nothing here knows what the answer should be: the
thresholds live in the config, and the report states the criterion next to the evidence.

Criteria (``--criteria``, YAML or JSON; a top-level ``claims:`` key is read if present, so the
whole config file can be passed). Claim ids: ``bridge`` (1), ``semantic_core`` (2),
``abstraction`` (3), ``selective_ft`` (4). Example::

    claims:
      thirds: [0.333, 0.667]   # relative-depth bounds early | middle | late (middle inclusive)
      bridge:                  # 1. tuning puts image information into the middle layers
        require: all
        tests:
          - table: geometry
            metric: neighbour_overlap
            modality: image~text
            pooling: last
            compare: [tuned, aligned]        # gain = tuned - aligned at each depth
            statistic: argmax_gain_band      # the depth of peak gain lies in `band`
            band: middle
            min_gain: 0.0                    # ... and the peak gain exceeds this
      semantic_core:           # 2. the middle layers carry the semantics and drive the answer
        tests:
          - table: probe
            modality_train: text
            modality_test: image             # text-trained probes read image representations
            pooling: last
            compare: [tuned, aligned]
            statistic: argmax_gain_band
            band: middle
          - table: intervention
            intervention: knockout
            queries: text
            modality: image
            task: vision
            subset: all
            metric: accuracy
            role: tuned
            column: delta
            statistic: argmin_band           # the most harmful window lies in `band`
            band: middle
      abstraction:             # 3. tuning extends the LLM's mid-depth high-ID phase to images
        tests:
          - table: geometry
            metric: id_gride
            scale: 32
            modality: image
            pooling: last
            role: tuned
            statistic: argmax_band           # tuned's image-ID peak lies in the middle third
            band: middle
          - table: geometry
            metric: id_gride
            scale: 32
            modality: text
            pooling: last
            role: base
            statistic: interior_peak         # base's text-ID profile has an interior peak
            min_rise: 0.05                   # >= 5% above both ends of the profile
      selective_ft:            # 4. tuning only the middle band keeps full FT's vision score
        tests:
          - table: finetune
            comparison: equal_steps          # final models (equal_time: at the same training time)
            task: vision
            modality: image
            subset: all
            statistic: within_and_faster
            variant: middle
            reference: full
            max_drop: 0.03                   # accuracy at most 3 points below full FT's
            time: step_seconds               # ... with a lower mean time per step
            controls: [early, late, complement]   # reported in the evidence
            controls_lower: false            # true: every control must score below `variant`

Test keys. ``table``: geometry | probe | eval | intervention | finetune. ``statistic``: one of
:data:`STATISTICS` (below). Any other key naming a column of the table is a row filter (a value,
or a list of allowed values; ``scale`` matches to 1e-6); ``role`` filters on the model role
(the ``role`` column where the table has one, else ``--roles NAME=ROLE``, else the model name
when it is a role or contains one as a word, else ``variant``). ``column``: the value read
(default ``accuracy`` for probe and finetune, ``delta`` for intervention, ``value`` otherwise).
``band``: early | middle | late or ``[lo, hi]`` in relative depth; ``thirds`` may be set per test.
Rows left after filtering are averaged per model and relative depth (over seeds, probe labels,
...); they must agree on the table's condition columns (:data:`CONDITIONS`, e.g. ``scale`` of
geometry rows) unless the test lists the values to pool, else the test is ``not measured``.

Statistics:

* ``argmax_band`` / ``argmin_band``: the depth of the profile's maximum / minimum lies in
  ``band`` (one model after filtering);
* ``argmax_gain_band``: the depth of the maximum of ``compare[0] - compare[1]`` (roles; depths
  matched) lies in ``band`` and that peak gain is > ``min_gain`` (default 0);
* ``interior_peak``: the profile's maximum is neither its first nor its last depth and exceeds
  both ends by the fraction ``min_rise`` (default 0.05);
* ``gain_above``: mean of ``compare[0]`` minus mean of ``compare[1]`` > ``min_gain`` (no depth),
  e.g. a precondition that tuning helped at all: ``{table: eval, task: vision, modality: image,
  subset: all, metric: accuracy, compare: [tuned, aligned], statistic: gain_above}``;
* ``within_and_faster``: (finetune) ``variant``'s mean accuracy is at most ``max_drop`` below
  ``reference``'s and its mean ``time`` (a column, default ``step_seconds``) is lower.

Output: ``--out-parquet`` (claim, title, criterion, evidence, verdict, tests) and ``--out-md``, a
Markdown table with columns claim, criterion, evidence, verdict.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from vlmlayers.depth import THIRDS, band_bounds, band_of, in_band

SUPPORTED, NOT_SUPPORTED, NOT_MEASURED = "supported", "not supported", "not measured"
ROLE_ORDER = ("base", "aligned", "tuned", "variant")
CLAIMS: dict[str, str] = {
    "bridge": "1. Bridge into the middle",
    "semantic_core": "2. Semantic core",
    "abstraction": "3. Abstraction phase",
    "selective_ft": "4. Selective fine-tuning",
}
TABLES: dict[str, tuple[str, ...]] = {
    "geometry": (
        "layer", "relative_depth", "model", "modality", "pooling", "tap", "metric", "scale",
        "value", "ci_low", "ci_high", "n", "seed",
    ),
    "probe": (
        "layer", "relative_depth", "model", "modality_train", "modality_test", "pooling", "label",
        "accuracy", "ci_low", "ci_high", "control", "selectivity", "chance", "n", "seed", "value",
    ),
    "eval": (
        "model", "role", "modality", "task", "subset", "metric", "value", "ci_low", "ci_high",
        "n", "seed",
    ),
    "intervention": (
        "intervention", "window_start", "window_end", "relative_depth", "model", "role",
        "modality", "task", "subset", "metric", "value", "baseline", "delta", "ci_low", "ci_high",
        "n", "seed", "mode", "queries", "donor",
    ),
    "finetune": (
        "variant", "band", "layers", "seed", "comparison", "step", "trainable_params",
        "train_seconds", "step_seconds", "samples_per_second", "peak_mem_mb", "modality", "task",
        "subset", "accuracy", "ci_low", "ci_high", "n", "answer_logprob",
    ),
}  # fmt: skip
# Columns that name a condition: rows left after filtering must agree on each (else the test
# would average different measurements), unless the test lists the values it means to pool.
CONDITIONS: dict[str, tuple[str, ...]] = {
    "geometry": ("modality", "pooling", "metric", "scale"),
    "probe": ("modality_train", "modality_test", "pooling"),
    "eval": ("modality", "task", "subset", "metric"),
    "intervention": (
        "intervention",
        "modality",
        "task",
        "subset",
        "metric",
        "mode",
        "queries",
        "donor",
    ),
    "finetune": ("comparison", "task", "modality", "subset"),
}
OUT_COLUMNS = ("claim", "title", "criterion", "evidence", "verdict", "tests")
DEFAULT_COLUMN = {"probe": "accuracy", "finetune": "accuracy", "intervention": "delta"}
# Keys of a test that are not row filters.
RESERVED = {
    "table", "statistic", "compare", "role", "band", "thirds", "column", "min_gain", "min_rise",
    "max_drop", "time", "variant", "reference", "controls", "controls_lower", "note",
}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Model roles (shared with plots.py)


def parse_roles(pairs: Iterable[str] | None) -> dict[str, str]:
    """``["NAME=ROLE", ...]`` -> {name: role}."""
    roles = {}
    for pair in pairs or []:
        name, sep, role = pair.rpartition("=")
        if not sep or not name or role not in ROLE_ORDER:
            raise ValueError(f"--roles expects NAME=ROLE with ROLE in {ROLE_ORDER}, got {pair!r}")
        roles[name] = role
    return roles


def infer_role(name: str) -> str:
    """A model name's role when it is one or contains one as a word, else ``variant``."""
    words = set(re.split(r"[^a-z0-9]+", str(name).lower()))
    for role in ("tuned", "aligned", "base"):
        if role in words:
            return role
    return "variant"


def model_roles(table: pd.DataFrame, overrides: Mapping[str, str] | None = None) -> dict[str, str]:
    """{model name: role}: the table's ``role`` column, else ``overrides``, else the name."""
    overrides = dict(overrides or {})
    if "model" not in table.columns:
        return {}
    roles = {}
    if "role" in table.columns:
        roles = table.drop_duplicates("model").set_index("model")["role"].astype(str).to_dict()
    for name in table["model"].astype(str).unique():
        roles.setdefault(name, overrides.get(name, infer_role(name)))
    return roles


def with_roles(table: pd.DataFrame, overrides: Mapping[str, str] | None = None) -> pd.DataFrame:
    """The table with a ``role`` column (added when missing)."""
    if "model" not in table.columns:
        return table
    table = table.copy()
    table["model"] = table["model"].astype(str)
    if "role" not in table.columns:
        table["role"] = table["model"].map(model_roles(table, overrides))
    return table


def model_order(roles: Mapping[str, str]) -> list[str]:
    """Model names ordered by role (base, aligned, tuned, variant), then name."""
    rank = {r: i for i, r in enumerate(ROLE_ORDER)}
    return sorted(roles, key=lambda m: (rank.get(roles[m], len(rank)), m))


def read_tables(paths: Iterable[str | Path] | None) -> pd.DataFrame | None:
    """Concatenated tables, or None when no path is given (an empty file gives an empty frame)."""
    paths = list(paths or [])
    if not paths:
        return None
    frames = [pd.read_parquet(p) for p in paths]
    frames = [f for f in frames if len(f)] or frames[:1]
    return pd.concat(frames, ignore_index=True)


# ---------------------------------------------------------------------------------------------
# Criteria


class NotMeasured(Exception):
    """The test's rows are absent: its verdict is ``not measured`` (the message says why)."""


@dataclass
class Outcome:
    verdict: str
    criterion: str
    evidence: str
    numbers: dict


@dataclass
class Statistic:
    """One statistic of the vocabulary: ``describe(test)`` -> criterion text,
    ``evaluate(rows, test)`` -> (passed, evidence text, numbers)."""

    describe: Callable[[dict], str]
    evaluate: Callable[[pd.DataFrame, dict], tuple[bool, str, dict]]
    needs: tuple[str, ...] = ()


STATISTICS: dict[str, Statistic] = {}


def register(name: str, describe, evaluate, needs: tuple[str, ...] = ()) -> None:
    """Add a statistic to the vocabulary (criteria name it by ``statistic: NAME``)."""
    STATISTICS[name] = Statistic(describe, evaluate, needs)


def load_criteria(path: str | Path) -> dict:
    """Criteria mapping from a YAML or JSON file (its ``claims`` key if it has one), checked."""
    import yaml

    text = Path(path).read_text()
    data = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
    data = data or {}
    if isinstance(data, dict) and "claims" in data:
        data = data["claims"] or {}
    check_criteria(data, source=str(path))
    return data


def check_criteria(criteria: Mapping, source: str = "criteria") -> None:
    """Raise ValueError naming the claim and key of anything malformed."""
    if not isinstance(criteria, Mapping):
        raise ValueError(f"{source}: expected a mapping of claims, got {type(criteria).__name__}")
    for key, spec in criteria.items():
        if key == "thirds":
            _check_thirds(spec, f"{source}: thirds")
            continue
        if key not in CLAIMS:
            raise ValueError(f"{source}: unknown claim {key!r} (expected one of {list(CLAIMS)})")
        where = f"{source}: {key}"
        if not isinstance(spec, Mapping) or not isinstance(spec.get("tests"), list):
            raise ValueError(f"{where}: expected a mapping with a list of `tests`")
        extra = set(spec) - {"tests", "require", "thirds", "note"}
        if extra:
            raise ValueError(f"{where}: unknown key(s) {sorted(extra)}")
        if spec.get("require", "all") not in ("all", "any"):
            raise ValueError(f"{where}: require must be all or any, got {spec['require']!r}")
        if "thirds" in spec:
            _check_thirds(spec["thirds"], f"{where}: thirds")
        for i, test in enumerate(spec["tests"]):
            _check_test(test, f"{where}: test {i + 1}")


def _check_thirds(thirds, where: str) -> None:
    ok = isinstance(thirds, list | tuple) and len(thirds) == 2
    if not ok or not 0 <= float(thirds[0]) < float(thirds[1]) <= 1:
        raise ValueError(f"{where}: expected [lo, hi] with 0 <= lo < hi <= 1, got {thirds!r}")


def _check_test(test, where: str) -> None:
    if not isinstance(test, Mapping):
        raise ValueError(f"{where}: expected a mapping")
    table = test.get("table")
    if table not in TABLES:
        raise ValueError(f"{where}: table must be one of {list(TABLES)}, got {table!r}")
    name = test.get("statistic")
    if name not in STATISTICS:
        raise ValueError(f"{where}: statistic must be one of {sorted(STATISTICS)}, got {name!r}")
    unknown = set(test) - RESERVED - set(TABLES[table])
    if unknown:
        raise ValueError(
            f"{where}: {sorted(unknown)} are neither options nor columns of the {table} table"
        )
    missing = [k for k in STATISTICS[name].needs if k not in test]
    if missing:
        raise ValueError(f"{where}: statistic {name} needs {missing}")
    if "compare" in test and (not isinstance(test["compare"], list) or len(test["compare"]) != 2):
        raise ValueError(f"{where}: compare must be [role, role], got {test['compare']!r}")
    if "band" in test:
        band_bounds(test["band"], test.get("thirds", THIRDS))
    if "thirds" in test:
        _check_thirds(test["thirds"], f"{where}: thirds")


# ---------------------------------------------------------------------------------------------
# Selecting rows


def select(table: pd.DataFrame | None, test: Mapping, roles: Mapping[str, str]) -> pd.DataFrame:
    """Rows of ``table`` passing the test's filters (raises NotMeasured when none are left)."""
    kind = test["table"]
    if table is None:
        raise NotMeasured(f"no {kind} table given")
    if table.empty:
        raise NotMeasured(f"{kind} table is empty")
    rows = with_roles(table, roles)
    if "tap" in rows.columns and "tap" not in test:  # per-head / MLP rows only when named
        rows = rows[rows["tap"].astype(str) == "residual"]
    described = []
    for key, want in test.items():
        if key in RESERVED and key != "role":
            continue
        if key not in rows.columns:
            raise NotMeasured(f"{kind} table has no column {key!r}")
        allowed = want if isinstance(want, list) else [want]
        column = rows[key]
        if pd.api.types.is_numeric_dtype(column) and all(_is_number(a) for a in allowed):
            mask = np.zeros(len(rows), bool)
            for a in allowed:
                mask |= np.isclose(column.to_numpy(float), float(a), rtol=0, atol=1e-6)
        else:
            mask = column.astype(str).isin([str(a) for a in allowed]).to_numpy()
        rows = rows[mask]
        described.append(f"{key}={want}")
    if rows.empty:
        raise NotMeasured(f"no {kind} rows with {', '.join(described) or 'any value'}")
    for column in CONDITIONS[kind]:
        if column in rows.columns and not isinstance(test.get(column), list):
            values = rows[column].astype(str).unique()
            if len(values) > 1:
                raise NotMeasured(
                    f"ambiguous: {kind} rows differ in {column} {sorted(values)}; add "
                    f"`{column}:` to the criterion (a list pools them)"
                )
    return rows


def _is_number(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _value_column(test: Mapping) -> str:
    return test.get("column", DEFAULT_COLUMN.get(test["table"], "value"))


def profiles(rows: pd.DataFrame, test: Mapping) -> pd.DataFrame:
    """Mean value per model and relative depth: columns model, role, relative_depth, value."""
    column = _value_column(test)
    if column not in rows.columns:
        raise NotMeasured(f"{test['table']} table has no column {column!r}")
    if "relative_depth" not in rows.columns:
        raise NotMeasured(f"{test['table']} table has no relative_depth")
    rows = rows.assign(relative_depth=rows["relative_depth"].astype(float).round(6))
    rows = rows[np.isfinite(rows[column].astype(float))]
    if rows.empty:
        raise NotMeasured(f"only NaN values in {column!r}")
    keys = ["model", "role", "relative_depth"] if "model" in rows.columns else ["relative_depth"]
    out = rows.groupby(keys, as_index=False)[column].mean().rename(columns={column: "value"})
    if "model" not in out.columns:
        out["model"], out["role"] = "", ""
    return out


def _one_model(prof: pd.DataFrame, what: str) -> pd.Series:
    models = prof["model"].unique()
    if len(models) == 0:
        raise NotMeasured(f"no rows for {what}")
    if len(models) > 1:
        raise NotMeasured(
            f"{what} matches several models {sorted(models)}: add `model:` to the criterion"
        )
    return prof.set_index("relative_depth")["value"].sort_index()


def _gain_profile(rows: pd.DataFrame, test: Mapping) -> pd.Series:
    prof = profiles(rows, test)
    first, second = test["compare"]
    a = _one_model(prof[prof["role"] == first], f"role {first}")
    b = _one_model(prof[prof["role"] == second], f"role {second}")
    gain = (a - b).dropna()
    if gain.empty:
        raise NotMeasured(f"{first} and {second} share no depth")
    return gain


def _profile_of(rows: pd.DataFrame, test: Mapping) -> pd.Series:
    prof = profiles(rows, test)
    what = f"role {test['role']}" if "role" in test else "the selected rows"
    return _one_model(prof, what)


def _thirds(test: Mapping) -> tuple[float, float]:
    a, b = test.get("thirds", THIRDS)
    return float(a), float(b)


def _band_text(band, thirds) -> str:
    if isinstance(band, str):
        lo, hi = band_bounds(band, thirds)
        lo, hi = max(lo, 0.0), min(hi, 1.0)
        return f"the {band} third (relative depth {lo:.2f}-{hi:.2f})"
    lo, hi = band_bounds(band, thirds)
    return f"relative depth {lo:.2f}-{hi:.2f}"


def _filters_text(test: Mapping) -> str:
    columns = TABLES[test["table"]]
    keys = sorted((k for k in test if k not in RESERVED), key=columns.index)
    parts = [f"{k}={test[k]}" for k in keys]
    parts += [f"role={test['role']}"] if "role" in test else []
    return f"{test['table']}[{', '.join(parts)}]" if parts else test["table"]


def _per_band(series: pd.Series, thirds) -> str:
    means = [
        series[[band_of(d, thirds) == band for d in series.index]].mean()
        for band in ("early", "middle", "late")
    ]
    return "/".join("n/a" if not np.isfinite(m) else f"{m:+.3f}" for m in means)


# ---------------------------------------------------------------------------------------------
# The statistics


def _describe_arg(kind: str):
    def describe(test: dict) -> str:
        return (
            f"{kind} of {_value_column(test)} over depth in {_filters_text(test)} lies in "
            f"{_band_text(test['band'], _thirds(test))}"
        )

    return describe


def _evaluate_arg(kind: str):
    def evaluate(rows: pd.DataFrame, test: dict):
        prof = _profile_of(rows, test)
        depth = float(prof.idxmax() if kind == "maximum" else prof.idxmin())
        thirds = _thirds(test)
        passed = in_band(depth, test["band"], thirds)
        evidence = (
            f"{kind} {prof[depth]:.3g} at relative depth {depth:.2f} "
            f"({band_of(depth, thirds)}); range {prof.min():.3g}-{prof.max():.3g} over "
            f"{len(prof)} depths"
        )
        return passed, evidence, {"depth": depth, "value": float(prof[depth])}

    return evaluate


register("argmax_band", _describe_arg("maximum"), _evaluate_arg("maximum"), needs=("band",))
register("argmin_band", _describe_arg("minimum"), _evaluate_arg("minimum"), needs=("band",))


def _describe_gain_band(test: dict) -> str:
    first, second = test["compare"]
    return (
        f"peak of {first} - {second} {_value_column(test)} in {_filters_text(test)} lies in "
        f"{_band_text(test['band'], _thirds(test))} and exceeds {test.get('min_gain', 0.0):g}"
    )


def _evaluate_gain_band(rows: pd.DataFrame, test: dict):
    gain = _gain_profile(rows, test)
    thirds = _thirds(test)
    depth = float(gain.idxmax())
    peak = float(gain[depth])
    passed = in_band(depth, test["band"], thirds) and peak > float(test.get("min_gain", 0.0))
    evidence = (
        f"peak gain {peak:+.3f} at relative depth {depth:.2f} ({band_of(depth, thirds)}); "
        f"mean gain early/middle/late {_per_band(gain, thirds)}"
    )
    return passed, evidence, {"depth": depth, "gain": peak}


register("argmax_gain_band", _describe_gain_band, _evaluate_gain_band, needs=("band", "compare"))


def _describe_interior_peak(test: dict) -> str:
    rise = float(test.get("min_rise", 0.05))
    return (
        f"{_value_column(test)} over depth in {_filters_text(test)} peaks inside the profile "
        f"(not at its first or last depth), >= {rise:.0%} above both ends"
    )


def _evaluate_interior_peak(rows: pd.DataFrame, test: dict):
    prof = _profile_of(rows, test)
    if len(prof) < 3:
        raise NotMeasured(f"{len(prof)} depths: an interior peak needs >= 3")
    depth = float(prof.idxmax())
    peak, ends = float(prof[depth]), max(float(prof.iloc[0]), float(prof.iloc[-1]))
    rise = float(test.get("min_rise", 0.05))
    interior = prof.index[0] < depth < prof.index[-1]
    passed = interior and peak >= (1 + rise) * ends
    evidence = (
        f"maximum {peak:.3g} at relative depth {depth:.2f} "
        f"({'interior' if interior else 'an end'}); ends {prof.iloc[0]:.3g} / {prof.iloc[-1]:.3g}"
    )
    return passed, evidence, {"depth": depth, "value": peak, "ends": ends}


register("interior_peak", _describe_interior_peak, _evaluate_interior_peak)


def _describe_gain_above(test: dict) -> str:
    first, second = test["compare"]
    return (
        f"mean {_value_column(test)} of {first} - {second} in {_filters_text(test)} "
        f"> {test.get('min_gain', 0.0):g}"
    )


def _evaluate_gain_above(rows: pd.DataFrame, test: dict):
    column = _value_column(test)
    if column not in rows.columns:
        raise NotMeasured(f"{test['table']} table has no column {column!r}")
    first, second = test["compare"]
    means = {}
    for role in (first, second):
        values = rows.loc[rows["role"] == role, column].astype(float)
        values = values[np.isfinite(values)]
        if values.empty:
            raise NotMeasured(f"no rows for role {role}")
        means[role] = float(values.mean())
    gain = means[first] - means[second]
    passed = gain > float(test.get("min_gain", 0.0))
    evidence = f"{first} {means[first]:.3f} vs {second} {means[second]:.3f} (gain {gain:+.3f})"
    return passed, evidence, {"gain": gain, **means}


register("gain_above", _describe_gain_above, _evaluate_gain_above, needs=("compare",))


def _describe_within_and_faster(test: dict) -> str:
    time = test.get("time", "step_seconds")
    drop = float(test.get("max_drop", 0.0))
    text = (
        f"in {_filters_text(test)}, {test['variant']}'s {_value_column(test)} is at most "
        f"{drop:g} below {test['reference']}'s, with lower mean {time}"
    )
    if test.get("controls_lower"):
        text += f", and every control ({', '.join(test.get('controls', []))}) scores lower"
    return text


def _evaluate_within_and_faster(rows: pd.DataFrame, test: dict):
    column, time = _value_column(test), test.get("time", "step_seconds")
    for needed in (column, time, "variant"):
        if needed not in rows.columns:
            raise NotMeasured(f"finetune table has no column {needed!r}")
    means = rows.groupby(rows["variant"].astype(str))[[column, time]].mean()
    variant, reference = str(test["variant"]), str(test["reference"])
    for name in (variant, reference):
        if name not in means.index or not np.isfinite(means.loc[name]).all():
            raise NotMeasured(f"no finetune rows for variant {name!r}")
    acc, ref_acc = means.loc[variant, column], means.loc[reference, column]
    t, ref_t = means.loc[variant, time], means.loc[reference, time]
    drop = ref_acc - acc
    passed = drop <= float(test.get("max_drop", 0.0)) and t < ref_t
    evidence = (
        f"{variant} {acc:.3f} vs {reference} {ref_acc:.3f} (drop {drop:+.3f}); {time} "
        f"{t:.3g} vs {ref_t:.3g} ({(t / ref_t - 1) if ref_t else math.nan:+.0%})"
    )
    numbers = {"accuracy": acc, "reference_accuracy": ref_acc, "time": t, "reference_time": ref_t}
    controls = [str(c) for c in test.get("controls", [])]
    present = [c for c in controls if c in means.index]
    if present:
        evidence += "; controls " + ", ".join(f"{c} {means.loc[c, column]:.3f}" for c in present)
        numbers["controls"] = {c: float(means.loc[c, column]) for c in present}
    if test.get("controls_lower"):
        if len(present) < len(controls):
            missing = sorted(set(controls) - set(present))
            raise NotMeasured(f"no finetune rows for control(s) {missing}")
        passed = passed and all(means.loc[c, column] < acc for c in present)
    return bool(passed), evidence, numbers


register(
    "within_and_faster",
    _describe_within_and_faster,
    _evaluate_within_and_faster,
    needs=("variant", "reference"),
)


# ---------------------------------------------------------------------------------------------
# Verdicts


def run_test(test: Mapping, tables: Mapping[str, pd.DataFrame | None], roles) -> Outcome:
    stat = STATISTICS[test["statistic"]]
    test = dict(test)
    criterion = stat.describe(test)
    try:
        rows = select(tables.get(test["table"]), test, roles)
        passed, evidence, numbers = stat.evaluate(rows, test)
    except NotMeasured as why:
        return Outcome(NOT_MEASURED, criterion, str(why), {})
    return Outcome(SUPPORTED if passed else NOT_SUPPORTED, criterion, evidence, numbers)


def combine(verdicts: list[str], require: str = "all") -> str:
    if not verdicts:
        return NOT_MEASURED
    if require == "any":
        if SUPPORTED in verdicts:
            return SUPPORTED
        return NOT_MEASURED if NOT_MEASURED in verdicts else NOT_SUPPORTED
    if NOT_SUPPORTED in verdicts:
        return NOT_SUPPORTED
    return NOT_MEASURED if NOT_MEASURED in verdicts else SUPPORTED


def judge(
    criteria: Mapping,
    tables: Mapping[str, pd.DataFrame | None],
    roles: Mapping[str, str] | None = None,
) -> pd.DataFrame:
    """One row per claim: claim, title, criterion, evidence, verdict, tests (JSON details)."""
    check_criteria(criteria)
    rows = []
    for claim, title in CLAIMS.items():
        spec = criteria.get(claim)
        if not spec or not spec.get("tests"):
            rows.append(
                {
                    "claim": claim,
                    "title": title,
                    "criterion": "(no criterion configured)",
                    "evidence": "",
                    "verdict": NOT_MEASURED,
                    "tests": "[]",
                }
            )
            continue
        thirds = spec.get("thirds", criteria.get("thirds", THIRDS))
        outcomes = [
            run_test({"thirds": thirds, **test}, tables, roles or {}) for test in spec["tests"]
        ]
        require = spec.get("require", "all")
        joiner = " AND " if require == "all" else " OR "
        many = len(outcomes) > 1
        rows.append(
            {
                "claim": claim,
                "title": title,
                "criterion": joiner.join(
                    f"({i + 1}) {o.criterion}" if many else o.criterion
                    for i, o in enumerate(outcomes)
                ),
                "evidence": "; ".join(
                    f"({i + 1}) {o.verdict}: {o.evidence}" if many else o.evidence
                    for i, o in enumerate(outcomes)
                ),
                "verdict": combine([o.verdict for o in outcomes], require),
                "tests": json.dumps(
                    [{"verdict": o.verdict, "evidence": o.evidence, **o.numbers} for o in outcomes],
                    default=float,
                ),
            }
        )
    return pd.DataFrame(rows, columns=list(OUT_COLUMNS))


def to_markdown(table: pd.DataFrame, sources: Mapping[str, list] | None = None) -> str:
    """A Markdown table (claim, criterion, evidence, verdict) with a short header."""

    def cell(text: str) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    lines = [
        "# The four claims: verdicts of this run",
        "",
        "Each verdict applies the stated criterion (from the config) to the measured tables; "
        "`not measured` means its inputs were absent or lacked the rows it needs.",
        "",
    ]
    if sources:
        given = [f"{kind}: {len(paths)} file(s)" for kind, paths in sources.items() if paths]
        lines += [f"Inputs: {'; '.join(given) or 'none'}.", ""]
    lines += ["| claim | criterion | evidence | verdict |", "|---|---|---|---|"]
    for row in table.itertuples():
        verdict = f"**{row.verdict}**"
        lines.append(
            f"| {cell(row.title)} | {cell(row.criterion)} | {cell(row.evidence)} | {verdict} |"
        )
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# The stage


def add_arguments(parser: argparse.ArgumentParser) -> None:
    for kind in TABLES:
        parser.add_argument(
            f"--{kind}",
            nargs="*",
            type=Path,
            default=[],
            metavar="PARQUET",
            help=f"{kind} table(s) (optional; absent -> its tests are not measured)",
        )
    parser.add_argument(
        "--criteria", type=Path, required=True, help="YAML or JSON criteria (see above)"
    )
    parser.add_argument(
        "--roles",
        nargs="*",
        default=[],
        metavar="NAME=ROLE",
        help="model roles (base|aligned|tuned|variant) for tables without a role column",
    )
    parser.add_argument("--out-parquet", type=Path, required=True, help="verdicts table")
    parser.add_argument("--out-md", type=Path, required=True, help="verdicts as Markdown")


def run(args: argparse.Namespace) -> None:
    from vlmlayers.io import atomic_path, write_parquet

    criteria = load_criteria(args.criteria)
    sources = {kind: list(getattr(args, kind) or []) for kind in TABLES}
    tables = {kind: read_tables(paths) for kind, paths in sources.items()}
    table = judge(criteria, tables, parse_roles(args.roles))
    write_parquet(table, args.out_parquet)
    with atomic_path(args.out_md) as tmp:
        tmp.write_text(to_markdown(table, sources))
