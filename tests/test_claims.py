"""Claims table: verdicts follow the planted evidence; absent inputs are `not measured`."""

from __future__ import annotations

import copy
import itertools
import json
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from vlmlayers import claims, cli
from vlmlayers.claims import (
    CLAIMS,
    NOT_MEASURED,
    NOT_SUPPORTED,
    STATISTICS,
    SUPPORTED,
    check_criteria,
    judge,
    to_markdown,
)

LAYERS = np.arange(1, 13)  # 12 decoder blocks, relative depth l / 12
PEAK = {"early": 2, "middle": 6, "late": 11}


def docstring_example() -> dict:
    """The criteria block of claims.py's docstring (the one copied into the config)."""
    doc = claims.__doc__
    block = doc.split("Example::\n\n", 1)[1]
    lines = []
    for line in block.splitlines():
        if line and not line.startswith("    "):
            break
        lines.append(line)
    return yaml.safe_load(textwrap.dedent("\n".join(lines)))["claims"]


CRITERIA = docstring_example()


def bump(peak_layer: int, height: float, width: float = 1.5) -> np.ndarray:
    return height * np.exp(-0.5 * ((LAYERS - peak_layer) / width) ** 2)


def geometry(overlap_peak="middle", image_id_peak="middle", text_id_interior=True) -> pd.DataFrame:
    rows = []

    def add(model, modality, metric, scale, values):
        for seed in (0, 1):  # two seeds: averaged
            for layer, v in zip(LAYERS, values, strict=True):
                rows.append(
                    {"layer": layer, "relative_depth": layer / 12, "model": model,
                     "modality": modality, "pooling": "last", "metric": metric, "scale": scale,
                     "value": v + 0.001 * seed, "ci_low": v - 0.01, "ci_high": v + 0.01,
                     "n": 500, "seed": seed}
                )  # fmt: skip

    flat = np.full(len(LAYERS), 0.10)
    add("aligned", "image~text", "neighbour_overlap", 30.0, flat)
    add("tuned", "image~text", "neighbour_overlap", 30.0, flat + bump(PEAK[overlap_peak], 0.1))
    for scale in (16.0, 32.0):
        add("tuned", "image", "id_gride", scale, 5 + bump(PEAK[image_id_peak], 4))
        text = 3 + bump(PEAK["middle"], 3) if text_id_interior else 6 - LAYERS / 4
        add("base", "text", "id_gride", scale, text)
        add("aligned", "image", "id_gride", scale, np.full(len(LAYERS), 5.0))
    add("tuned", "image", "id_twonn", np.nan, np.full(len(LAYERS), 9.0))
    return pd.DataFrame(rows)


def probe(peak="middle") -> pd.DataFrame:
    rows = []
    for model, (mtr, mte), label, layer in itertools.product(
        ["aligned", "tuned"], [("image", "image"), ("text", "image")], ["colour", "shape"], LAYERS
    ):
        gain = bump(PEAK[peak], 0.3)[layer - 1] if model == "tuned" and mtr == "text" else 0
        acc = 0.4 + gain
        rows.append(
            {"layer": layer, "relative_depth": layer / 12, "model": model,
             "modality_train": mtr, "modality_test": mte, "pooling": "last", "label": label,
             "accuracy": acc, "ci_low": acc - 0.05, "ci_high": acc + 0.05, "control": 0.25,
             "selectivity": acc - 0.25, "chance": 0.25, "n": 100, "seed": 0, "value": acc}
        )  # fmt: skip
    return pd.DataFrame(rows)


def intervention(worst="middle") -> pd.DataFrame:
    rows = []
    for model, task, start in itertools.product(["tuned"], ["vision", "knowledge"], LAYERS[::2]):
        delta = -0.3 if abs(start - PEAK[worst]) <= 1 else -0.02
        rows.append(
            {"intervention": "knockout", "window_start": start, "window_end": start + 1,
             "relative_depth": start / 12, "model": model, "task": task, "metric": "accuracy",
             "value": 0.8 + delta, "delta": delta, "ci_low": delta - 0.05,
             "ci_high": delta + 0.05, "n": 200, "modality": "image", "subset": "all",
             "queries": "text", "mode": "sliding", "donor": None}
        )  # fmt: skip
    return pd.DataFrame(rows)


def finetune(middle_acc=0.79, middle_step=0.6) -> pd.DataFrame:
    rows = []
    variants = {"full": (0.81, 1.0), "middle": (middle_acc, middle_step), "early": (0.7, 0.4),
                "late": (0.75, 0.5), "complement": (0.8, 0.8)}  # fmt: skip
    for (variant, (acc, step)), seed, task, modality in itertools.product(
        variants.items(), [0, 1], ["vision", "knowledge"], ["image", "text"]
    ):
        a = acc + (0.01 if seed else -0.01) - (0.2 if task == "knowledge" else 0)
        rows.append(
            {"variant": variant, "band": variant, "seed": seed, "trainable_params": 100,
             "train_seconds": step * 300, "step_seconds": step, "peak_mem_mb": 100.0,
             "task": task, "modality": modality, "accuracy": a, "ci_low": a - 0.03,
             "ci_high": a + 0.03, "comparison": "equal_steps", "subset": "all"}
        )  # fmt: skip
    return pd.DataFrame(rows)


def verdicts(criteria=CRITERIA, **tables) -> dict[str, str]:
    table = judge(criteria, tables)
    assert list(table["claim"]) == list(CLAIMS)
    return dict(zip(table["claim"], table["verdict"], strict=True))


def test_docstring_example_is_valid_and_uses_the_vocabulary():
    check_criteria(CRITERIA)
    used = {t["statistic"] for spec in CRITERIA.values() if isinstance(spec, dict)
            for t in spec["tests"]}  # fmt: skip
    assert used == set(STATISTICS) - {"gain_above"}  # gain_above: documented inline
    assert set(CRITERIA) - {"thirds"} == set(CLAIMS)


def test_everything_absent_is_not_measured():
    assert set(verdicts().values()) == {NOT_MEASURED}
    empty = {k: f().iloc[:0] for k, f in
             {"geometry": geometry, "probe": probe, "intervention": intervention,
              "finetune": finetune}.items()}  # fmt: skip
    assert set(verdicts(**empty).values()) == {NOT_MEASURED}
    table = judge({}, {"geometry": geometry()})
    assert (table["verdict"] == NOT_MEASURED).all()
    assert (table["criterion"] == "(no criterion configured)").all()


def test_all_planted_evidence_supports_every_claim():
    v = verdicts(
        geometry=geometry(), probe=probe(), intervention=intervention(), finetune=finetune()
    )
    assert v == dict.fromkeys(CLAIMS, SUPPORTED)


@pytest.mark.parametrize("peak, expected", [("middle", SUPPORTED), ("early", NOT_SUPPORTED),
                                            ("late", NOT_SUPPORTED)])  # fmt: skip
def test_bridge_follows_the_overlap_gain_peak(peak, expected):
    table = judge(CRITERIA, {"geometry": geometry(overlap_peak=peak)})
    row = table.set_index("claim").loc["bridge"]
    assert row["verdict"] == expected
    depth = PEAK[peak] / 12
    assert f"at relative depth {depth:.2f} ({peak})" in row["evidence"]
    assert "peak gain +0.1" in row["evidence"]
    assert "middle third" in row["criterion"] and "tuned - aligned" in row["criterion"]
    # Claims 2 and 4 have no input here.
    assert table.set_index("claim").loc["selective_ft", "verdict"] == NOT_MEASURED


def test_rows_of_different_conditions_are_not_averaged():
    geo = geometry()
    other_k = geo[geo["metric"] == "neighbour_overlap"].assign(scale=60.0)
    row = judge(CRITERIA, {"geometry": pd.concat([geo, other_k])}).set_index("claim")
    assert row.loc["bridge", "verdict"] == NOT_MEASURED
    assert "differ in scale" in row.loc["bridge", "evidence"]
    pick = {"tests": [{**CRITERIA["bridge"]["tests"][0], "scale": 30}]}
    assert verdicts({"bridge": pick}, geometry=pd.concat([geo, other_k]))["bridge"] == SUPPORTED


def test_bridge_needs_a_positive_gain_and_both_models():
    flat = geometry()
    flat = flat[~((flat["model"] == "tuned") & (flat["metric"] == "neighbour_overlap"))]
    tuned = flat[(flat["model"] == "aligned") & (flat["metric"] == "neighbour_overlap")]
    same = pd.concat([flat, tuned.assign(model="tuned", value=tuned["value"] - 0.05)])
    assert verdicts(geometry=same)["bridge"] == NOT_SUPPORTED  # peak gain -0.05 <= 0
    assert verdicts(geometry=flat)["bridge"] == NOT_MEASURED  # no tuned rows
    row = judge(CRITERIA, {"geometry": flat}).set_index("claim").loc["bridge"]
    assert "role tuned" in row["evidence"]


def test_semantic_core_needs_probes_and_interventions():
    assert verdicts(probe=probe(), intervention=intervention())["semantic_core"] == SUPPORTED
    assert verdicts(probe=probe("early"), intervention=intervention())["semantic_core"] == (
        NOT_SUPPORTED
    )
    assert verdicts(probe=probe(), intervention=intervention("late"))["semantic_core"] == (
        NOT_SUPPORTED
    )
    assert verdicts(probe=probe())["semantic_core"] == NOT_MEASURED  # require: all
    anyof = {**CRITERIA, "semantic_core": {**CRITERIA["semantic_core"], "require": "any"}}
    assert verdicts(anyof, probe=probe())["semantic_core"] == SUPPORTED
    assert verdicts(anyof, probe=probe("late"))["semantic_core"] == NOT_MEASURED


def test_abstraction_follows_the_id_peaks():
    assert verdicts(geometry=geometry())["abstraction"] == SUPPORTED
    assert verdicts(geometry=geometry(image_id_peak="late"))["abstraction"] == NOT_SUPPORTED
    assert verdicts(geometry=geometry(text_id_interior=False))["abstraction"] == NOT_SUPPORTED


def test_config_reads_twonn_on_all_points_among_its_scales():
    # config.yaml's abstraction claim also asks for an interior TwoNN peak on all points
    # (scale 2); the geometry stage writes TwoNN at larger scales too, which must not mix in.
    config = yaml.safe_load((Path(__file__).parents[1] / "config" / "config.yaml").read_text())
    criteria = config["claims"]
    rising, interior = 6 - LAYERS / 4, 3 + bump(PEAK["middle"], 3)
    geo = geometry()
    base_text = {"model": "base", "modality": "text", "pooling": "last", "metric": "id_twonn",
                 "relative_depth": LAYERS / 12, "layer": LAYERS, "seed": 0}  # fmt: skip

    def twonn(values, scale):
        return pd.DataFrame({**base_text, "value": values, "scale": scale})

    mixed = pd.concat([geo, twonn(rising, 2.0), twonn(interior, 32.0)])
    assert verdicts(criteria, geometry=mixed)["abstraction"] == NOT_SUPPORTED
    peaked = pd.concat([geo, twonn(interior, 2.0), twonn(rising, 32.0)])
    assert verdicts(criteria, geometry=peaked)["abstraction"] == SUPPORTED
    unpinned = copy.deepcopy(criteria)
    for test in unpinned["abstraction"]["tests"]:
        if test["metric"] == "id_twonn":
            del test["scale"]
    assert verdicts(unpinned, geometry=mixed)["abstraction"] == NOT_MEASURED


def test_selective_ft_within_and_faster():
    assert verdicts(finetune=finetune())["selective_ft"] == SUPPORTED
    assert verdicts(finetune=finetune(middle_acc=0.70))["selective_ft"] == NOT_SUPPORTED
    assert verdicts(finetune=finetune(middle_step=1.2))["selective_ft"] == NOT_SUPPORTED
    strict = {
        **CRITERIA,
        "selective_ft": {
            "tests": [{**CRITERIA["selective_ft"]["tests"][0], "controls_lower": True}]
        },
    }
    # The complement control (0.80) scores above middle (0.79): not supported when required.
    assert verdicts(strict, finetune=finetune())["selective_ft"] == NOT_SUPPORTED
    row = judge(CRITERIA, {"finetune": finetune()}).set_index("claim").loc["selective_ft"]
    assert "middle 0.790 vs full 0.810" in row["evidence"] and "complement 0.800" in row["evidence"]


def test_gain_above_on_eval_and_roles_from_the_command_line():
    rows = [
        {"model": name, "task": "vision", "modality": "image", "subset": "all",
         "metric": "accuracy", "value": v, "ci_low": v - 0.1, "ci_high": v + 0.1, "n": 50,
         "seed": 0}
        for name, v in (("llava-7b", 0.8), ("llava-7b-stage1", 0.4))
    ]  # fmt: skip
    test = {"table": "eval", "task": "vision", "metric": "accuracy", "statistic": "gain_above",
            "compare": ["tuned", "aligned"]}  # fmt: skip
    criteria = {"bridge": {"tests": [test]}}
    assert verdicts(criteria, eval=pd.DataFrame(rows))["bridge"] == NOT_MEASURED  # roles unknown
    roles = claims.parse_roles(["llava-7b=tuned", "llava-7b-stage1=aligned"])
    table = judge(criteria, {"eval": pd.DataFrame(rows)}, roles)
    assert table.loc[0, "verdict"] == SUPPORTED and "gain +0.400" in table.loc[0, "evidence"]


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"bridj": {"tests": []}}, "unknown claim"),
        ({"bridge": {"tests": [{"table": "geometry", "statistic": "argmax_band"}]}}, "needs"),
        ({"bridge": {"tests": [{"table": "geometry", "statistic": "peak"}]}}, "statistic"),
        ({"bridge": {"tests": [{"table": "geo", "statistic": "argmax_band"}]}}, "table"),
        ({"bridge": {"tests": [{"table": "geometry", "statistic": "argmax_band", "band": "middle",
                                "metrik": "x"}]}}, "metrik"),
        ({"bridge": {"tests": [{"table": "geometry", "statistic": "argmax_band",
                                "band": "centre"}]}}, "centre"),
        ({"thirds": [0.7, 0.3]}, "thirds"),
    ],
)  # fmt: skip
def test_malformed_criteria_are_rejected(bad, message):
    with pytest.raises(ValueError, match=message):
        check_criteria(bad)


def test_markdown_has_the_four_columns():
    table = judge(CRITERIA, {"geometry": geometry()})
    md = to_markdown(table)
    header = [line for line in md.splitlines() if line.startswith("| claim")]
    assert header == ["| claim | criterion | evidence | verdict |"]
    rows = [line for line in md.splitlines() if line.startswith("| ") and line not in header]
    assert len(rows) == len(CLAIMS) and all(line.count(" | ") == 3 for line in rows)
    assert "**supported**" in md and "**not measured**" in md


def test_cli_reads_yaml_or_json_and_writes_both_outputs(tmp_path):
    geo = tmp_path / "geometry.parquet"
    geometry().to_parquet(geo, index=False)
    empty = tmp_path / "finetune.parquet"
    finetune().iloc[:0].to_parquet(empty, index=False)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"seed": 0, "claims": CRITERIA}))
    as_json = tmp_path / "criteria.json"
    as_json.write_text(json.dumps(CRITERIA))
    outputs = []
    for i, criteria in enumerate((config, as_json)):
        out_pq, out_md = tmp_path / f"claims{i}.parquet", tmp_path / f"claims{i}.md"
        args = ["--geometry", geo, "--finetune", empty, "--criteria", criteria]
        args += ["--out-parquet", out_pq, "--out-md", out_md]
        cli.main(["claims", *map(str, args)])
        outputs.append((pd.read_parquet(out_pq), out_md.read_text()))
    (table, md), (table_json, md_json) = outputs
    pd.testing.assert_frame_equal(table, table_json)
    assert md == md_json and "geometry: 1 file(s)" in md
    v = dict(zip(table["claim"], table["verdict"], strict=True))
    assert v == {"bridge": SUPPORTED, "semantic_core": NOT_MEASURED, "abstraction": SUPPORTED,
                 "selective_ft": NOT_MEASURED}  # fmt: skip
    assert "finetune table is empty" in table.set_index("claim").loc["selective_ft", "evidence"]


def test_table_contracts_match_the_stages_that_write_them():
    from vlmlayers import geometry as geometry_stage
    from vlmlayers import intervene
    from vlmlayers import probe as probe_stage

    assert claims.TABLES["geometry"] == tuple(geometry_stage.COLUMNS)
    assert claims.TABLES["intervention"] == tuple(intervene.COLUMNS)
    assert set(claims.TABLES["probe"]) <= set(probe_stage.COLUMNS)


def test_per_head_rows_stay_out_of_a_criterion_unless_it_names_their_tap():
    base = {"relative_depth": 0.5, "model": "tuned", "role": "tuned", "modality": "image~text",
            "pooling": "last", "metric": "neighbour_overlap", "scale": 30.0}  # fmt: skip
    table = pd.DataFrame(
        [base | {"tap": "residual", "value": 0.2}, base | {"tap": "head.00", "value": 0.9}]
    )
    test = {"table": "geometry", "metric": "neighbour_overlap", "modality": "image~text"}
    assert claims.select(table, test, {})["value"].tolist() == [0.2]
    assert claims.select(table, test | {"tap": "head.00"}, {})["value"].tolist() == [0.9]
