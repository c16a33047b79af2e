import hashlib
import json
import os
from pathlib import Path

from vlmlayers.config import validate

validate(config, workflow.source_path("../schemas/config.schema.yaml"), source="config")

RESULTS = config["results_dir"]
WORLD = config["world"]
# The world keys that shape its data (the rest configure training).
WORLD_DATA_KEYS = (
    "seed",
    "image_size",
    "n_train",
    "n_test",
    "n_analysis",
    "n_corpus",
    "n_heldout_pairs",
)
SRC = Path(workflow.basedir) / "src" / "vlmlayers"
THREADS = config["threads"]


def code_version(*modules):
    """Hash of the package sources a job runs, so editing them reruns it (Snakemake's own
    `code` trigger does not see inside the imported package)."""
    digest = hashlib.sha256()
    for module in modules:
        digest.update((SRC / module).read_bytes())
    return digest.hexdigest()[:16]


def pretrained(kind):
    """Shipped tiny-world checkpoint (world.pretrained), or the one pretrain_{kind} writes."""
    pre = WORLD and WORLD["pretrained"]
    return f"{pre}/{kind}" if pre else f"{RESULTS}/models/{kind}"


def model_specs():
    """name -> spec: the tiny world's three checkpoints, then the config's own models."""
    specs = {}
    if WORLD:
        specs["base"] = {
            "path": pretrained("base"),
            "role": "base",
            "family": "llama",
        }
        for name in ("aligned", "tuned"):
            specs[name] = {
                "path": f"{RESULTS}/models/{name}",
                "role": name,
                "family": "llava",
            }
    for name, spec in config["models"].items():
        specs[name] = {"role": "tuned", "family": None, **spec}
    return specs


MODELS = model_specs()


def is_text_only(name):
    return MODELS[name]["role"] == "base"


def datasets():
    if WORLD:
        return {
            "tinyworld": {
                "path": f"{RESULTS}/world/analysis.parquet",
                "on_bad_rows": "error",
            }
        }
    return config["datasets"]


DATASETS = datasets()
BENCHMARK = (
    f"{RESULTS}/world/test.parquet"
    if WORLD
    else (config["benchmark"] or {}).get("path")
)


def intervention_runs():
    """name -> sweep of intervene.runs, checked against the models it names."""
    runs = config["intervene"]["runs"]
    if runs and not BENCHMARK:
        raise ValueError(
            "intervene.runs: interventions are scored on a benchmark; set benchmark.path"
        )
    for name, run in runs.items():
        for key in ("model", "donor"):
            if run.get(key) is not None and run[key] not in MODELS:
                raise ValueError(
                    f"intervene.runs.{name}.{key}: unknown model {run[key]!r}; "
                    f"known: {sorted(MODELS)}"
                )
        if run["intervention"] in ("transplant", "patching") and not run.get("donor"):
            raise ValueError(
                f"intervene.runs.{name}: {run['intervention']} needs a donor"
            )
    return runs


INTERVENTIONS = intervention_runs()


def finetune_settings():
    """The finetune section with stage-2 settings filled in, or None without variants."""
    ft = dict(config["finetune"])
    if not ft["variants"]:
        return None
    stage2 = WORLD["stage2"] if WORLD else {}
    for key in ("steps", "batch_size", "lr", "warmup"):
        if ft[key] is None:
            ft[key] = stage2.get(key)
        if ft[key] is None:
            raise ValueError(
                f"finetune.{key}: set it (there is no world.stage2 to take it from)"
            )
    ft["model"] = ft["model"] or ("aligned" if WORLD else None)
    if ft["model"] not in MODELS:
        raise ValueError(
            f"finetune.model: unknown model {ft['model']!r}; known: {sorted(MODELS)}"
        )
    ft["data"] = ft["data"] or (f"{RESULTS}/world/train.parquet" if WORLD else None)
    if not ft["data"]:
        raise ValueError("finetune.data: the VQA rows to tune on are not set")
    if not BENCHMARK:
        raise ValueError(
            "finetune: variants are scored on a benchmark; set benchmark.path"
        )
    return ft


FINETUNE = finetune_settings()


def modalities(name):
    return ["text"] if is_text_only(name) else ["image", "text"]


def checkpoint_input(name):
    """The checkpoint a job reads: a produced directory for tiny-world models, else nothing
    (hub ids and external paths are not Snakemake outputs)."""
    path = MODELS[name]["path"]
    return path if path.startswith(RESULTS) or Path(path).exists() else []


def model_input(wildcards):
    return checkpoint_input(wildcards.model)


def store(model, dataset, modality):
    return f"{RESULTS}/activations/{model}/{dataset}/{modality}"


def all_targets():
    targets = []
    if BENCHMARK:
        targets += expand(f"{RESULTS}/eval/{{model}}.parquet", model=MODELS)
    for model in MODELS:
        for dataset in DATASETS:
            targets.append(f"{RESULTS}/probe/{model}/{dataset}.parquet")
            targets.append(f"{RESULTS}/geometry/{model}/{dataset}.parquet")
    targets += figure_targets()
    return targets


def training_args(section):
    """CLI flags of one training section of the world config."""
    keys = (
        "steps",
        "batch_size",
        "lr",
        "warmup",
        "layers",
        "hidden",
        "heads",
        "n_images",
    )
    return " ".join(
        f"--{k.replace('_', '-')} {section[k]}"
        for k in keys
        if section.get(k) is not None
    )


def stores(wildcards):
    return {
        m: store(wildcards.model, wildcards.dataset, m)
        for m in modalities(wildcards.model)
    }


def store_args(wildcards, input):
    return " ".join(f"--{m} {getattr(input, m)}" for m in modalities(wildcards.model))


# figure kind -> the tables it reads
FIGURES = {
    "probe": "probe",
    "id": "geometry",
    "overlap": "geometry",
    "eval": "eval",
    "intervention": "intervention",
    "finetune": "finetune",
}


def analysis_tables(kind):
    """Every table of one kind the config produces (eval: per model; others: per model x data)."""
    if kind == "eval":
        return (
            expand(f"{RESULTS}/eval/{{model}}.parquet", model=MODELS)
            if BENCHMARK
            else []
        )
    if kind == "intervention":
        return expand(f"{RESULTS}/intervention/{{run}}.parquet", run=INTERVENTIONS)
    if kind == "finetune":
        return [f"{RESULTS}/finetune.parquet"] if FINETUNE else []
    return expand(
        f"{RESULTS}/{kind}/{{model}}/{{dataset}}.parquet",
        model=MODELS,
        dataset=DATASETS,
    )


def roles_args():
    return "--roles " + " ".join(
        f"{name}={spec['role']}" for name, spec in MODELS.items()
    )


def figure_kinds():
    """Figures whose tables this config produces."""
    return [kind for kind, table in FIGURES.items() if analysis_tables(table)]


def figure_targets():
    return [f"{RESULTS}/figures/{kind}.png" for kind in figure_kinds()] + [
        f"{RESULTS}/claims.md"
    ]


def intervention_models(wildcards):
    run = INTERVENTIONS[wildcards.run]
    models = {"model": checkpoint_input(run["model"])}
    if run.get("donor"):
        models["donor"] = checkpoint_input(run["donor"])
    return {key: path for key, path in models.items() if path}


def intervention_args(wildcards):
    run = INTERVENTIONS[wildcards.run]
    spec = MODELS[run["model"]]
    args = [
        f"--model {run['model']} --path {spec['path']} --role {spec['role']}",
        f"--intervention {run['intervention']} --window {run['window']}",
        f"--stride {run['stride']} --queries {run['queries']}",
    ]
    if run.get("mode"):
        args.append(f"--mode {run['mode']}")
    if run.get("donor"):
        args.append(
            f"--donor {run['donor']} --donor-path {MODELS[run['donor']]['path']}"
        )
    return " ".join(args)
