import hashlib
import json
import os
import shlex
from pathlib import Path

from vlmlayers.config import training_flags, validate

CONFIG_SCHEMA = workflow.source_path("../schemas/config.schema.yaml")
validate(config, CONFIG_SCHEMA, source="config")

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
# GPUs a tiny-world training job asks for (world.gpu); the trainers use any GPU they get.
WORLD_GPU = WORLD["gpu"] if WORLD else 0


def checkpoint_every(section):
    """Steps between a world training job's checkpoints: its section's own, else the world's."""
    return (
        WORLD[section].get("checkpoint_every", WORLD["checkpoint_every"])
        if WORLD
        else 0
    )


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
        if "compose" in spec:  # built by rule compose (compose.smk)
            specs[name]["path"] = f"{RESULTS}/models/{name}"
    return specs


MODELS = model_specs()


def spec_args(name, prefix=""):
    """A model spec as `vlmlayers` flags (models.add_spec_arguments), shell-quoted."""
    spec = MODELS[name]
    args = [f"--{prefix}path", spec["path"]]
    for key in ("family", "revision"):
        if spec.get(key):
            args += [f"--{prefix}{key}", spec[key]]
    if spec.get("trust_remote_code"):
        args.append(f"--{prefix}trust-remote-code")
    if not prefix:
        args += ["--role", spec["role"]]
    return shlex.join(args)


def model_dtype(name, stage_dtype="auto"):
    """The spec's dtype where it names one, else the stage's."""
    dtype = MODELS[name].get("dtype", "auto")
    return stage_dtype if dtype == "auto" else dtype


def is_text_only(name):
    return MODELS[name]["role"] == "base"


def prepared(name):
    """Where `prepare_data` writes a dataset given by `source` (bring-your-own adapters)."""
    return f"{RESULTS}/data/{name}.parquet"


def datasets():
    """name -> {path, on_bad_rows}; a `source` entry reads the contract Parquet prepared from it."""
    if WORLD:
        return {
            "tinyworld": {
                "path": f"{RESULTS}/world/analysis.parquet",
                "on_bad_rows": "error",
            }
        }
    return {
        name: {**entry, "path": prepared(name) if "source" in entry else entry["path"]}
        for name, entry in config["datasets"].items()
    }


def data_sources():
    """name -> source of every dataset (and the benchmark) that `prepare_data` converts."""
    if WORLD:
        return {}
    sources = {
        name: entry["source"]
        for name, entry in config["datasets"].items()
        if "source" in entry
    }
    benchmark = config["benchmark"] or {}
    if "source" in benchmark:
        if "benchmark" in sources:
            raise ValueError(
                "datasets.benchmark: the name is taken by the benchmark's source"
            )
        sources["benchmark"] = benchmark["source"]
    return sources


def benchmark_path():
    if WORLD:
        return f"{RESULTS}/world/test.parquet"
    benchmark = config["benchmark"] or {}
    return prepared("benchmark") if "source" in benchmark else benchmark.get("path")


DATASETS = datasets()
SOURCES = data_sources()
BENCHMARK = benchmark_path()


def source_inputs(wildcards):
    """A source's local files and folders, so editing them remakes the prepared Parquet (a hub
    id is not a file: it is read from the Hugging Face cache)."""
    source = SOURCES[wildcards.dataset]
    # An images folder (COCO: 40k files) is not an input: its files enter the prepared Parquet,
    # but editing them in place needs --forcerun prepare_data (config/README.md).
    return [
        p
        for k in ("path", "questions")
        if source.get(k)
        for p in local_input(source[k])
    ]


def prepare_args(wildcards):
    """`vlmlayers prepare` flags of a source, shell-quoted."""
    source = SOURCES[wildcards.dataset]
    args = ["--format", source["format"], "--path", source["path"]]
    for key in ("images", "questions", "split"):
        if source.get(key):
            args += [f"--{key}", source[key]]
    if source.get("rename"):
        args += ["--rename", *(f"{k}={v}" for k, v in source["rename"].items())]
    args += ["--n", str(source["n"]), "--seed", str(source["seed"])]
    args += ["--on-bad-rows", source["on_bad_rows"]]
    return shlex.join(args)


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


def local_input(path):
    """The job inputs that stand for `path`: itself when the workflow makes it or it is a file
    here; none for a hub id or a file on the cluster only (the job reads it, and names it when
    it is missing). A directory here stands as the files in it: Snakemake's cache hashes input
    files by content (and cannot open a directory), so a changed checkpoint or dataset is a new
    cache entry."""
    local = Path(path)
    if path.startswith(RESULTS) or local.is_file():
        return [path]
    if local.is_dir():
        files = sorted(
            f for f in local.rglob("*") if f.is_file() and not f.name.startswith(".")
        )
        return [str(f) for f in files]
    return []


def lmms_args(wildcards):
    """vlmlayers evaluate's lmms-eval flags: task names, extra tasks and task folders."""
    e = config["evaluate"]
    words = ["--task-prefix", e["task_prefix"]]
    if e["lmms_tasks"] and "image" in modalities(wildcards.model):  # image-form tasks
        words += ["--lmms-tasks", *e["lmms_tasks"]]
    if e["include_path"]:
        words += ["--include-path", *e["include_path"]]
    if e["captioning"]:
        words.append("--captioning")
    return shlex.join(words)


def digest_of(checkpoint):
    """The digest file (`vlmlayers digest`) a rule writes beside a checkpoint it makes."""
    return f"{checkpoint}.digest.json"


def with_digest(command):
    """The shell command of a rule that makes a checkpoint (outputs `model` and `digest`),
    followed by the digest of what it wrote."""
    return f"{command} && vlmlayers digest {{output.model:q}} --out {{output.digest:q}} >> {{log:q}} 2>&1"


def cache_key(wildcards):
    """A cacheable rule's wildcards as a param: Snakemake's between-workflow cache key covers
    the rule's shell command *unformatted* and its params, not the wildcards that fill the
    command in (extraction of a model's image and text forms would share one entry)."""
    return dict(wildcards.items())


def checkpoint_files(path):
    """The job inputs that stand for a checkpoint directory: the digest beside it when the
    workflow makes it (Snakemake's cache cannot hash a directory, and in a SLURM job step it
    hashes every input by content), else `local_input`."""
    return [digest_of(path)] if path.startswith(RESULTS) else local_input(path)


def checkpoint_input(name):
    """The inputs that stand for a model's checkpoint (tiny-world models are made here)."""
    return checkpoint_files(MODELS[name]["path"])


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


def stores(wildcards):
    return {
        m: store(wildcards.model, wildcards.dataset, m)
        for m in modalities(wildcards.model)
    }


def store_args(wildcards, input):
    return " ".join(
        f"--{m} {shlex.quote(getattr(input, m))}" for m in modalities(wildcards.model)
    )


# figure kind -> the tables it reads
FIGURES = {
    "probe": "probe",
    "id": "geometry",
    "overlap": "geometry",
    "eval": "eval",
    "intervention": "intervention",
    "finetune": "finetune",
    "curve": "finetune",
    "similarity": "compare",
    "modality_gap": "geometry",
    "entropy": "geometry",
    "heads": "geometry",
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
    if kind == "compare":
        return compare_tables()
    return expand(
        f"{RESULTS}/{kind}/{{model}}/{{dataset}}.parquet",
        model=MODELS,
        dataset=DATASETS,
    )


def roles_args():
    return shlex.join(["--roles", *(f"{n}={s['role']}" for n, s in MODELS.items())])


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
    args = [
        f"--model {shlex.quote(run['model'])} {spec_args(run['model'])}",
        f"--dtype {model_dtype(run['model'])}",
        f"--intervention {run['intervention']} --window {run['window']}",
        f"--stride {run['stride']} --queries {run['queries']}",
    ]
    if run.get("mode"):
        args.append(f"--mode {run['mode']}")
    if run.get("donor"):
        donor = run["donor"]
        args.append(f"--donor {shlex.quote(donor)} {spec_args(donor, 'donor-')}")
    return " ".join(args)


def compare_pairs():
    """(A, B) -> prompt forms compared (compare.pairs, checked against the models): those of
    compare.modalities that both models have, so image only between two VLMs."""
    c = config["compare"]
    pairs = {}
    for a, b in c["pairs"]:
        for name in (a, b):
            if name not in MODELS:
                raise ValueError(
                    f"compare.pairs: unknown model {name!r}; known: {sorted(MODELS)}"
                )
            if "~" in name or "/" in name:
                raise ValueError(f"compare.pairs: {name!r}: '~' and '/' not allowed")
        if a == b:
            raise ValueError(f"compare.pairs: [{a}, {b}] compares a model with itself")
        both = set(modalities(a)) & set(modalities(b))
        forms = [m for m in c["modalities"] if m in both]
        if not forms:
            raise ValueError(
                f"compare.pairs: {a} and {b} share no prompt form in {c['modalities']}"
            )
        pairs[(a, b)] = forms
    return pairs


COMPARE = compare_pairs()


def compare_tables():
    """One table per compared pair and dataset."""
    return expand(
        f"{RESULTS}/compare/{{pair}}/{{dataset}}.parquet",
        pair=[f"{a}~{b}" for a, b in COMPARE],
        dataset=DATASETS,
    )


def compare_stores(wildcards):
    """The two models' activation stores, per prompt form compared (a_image, b_image, ...)."""
    models = {"a": wildcards.a, "b": wildcards.b}
    return {
        f"{side}_{m}": store(name, wildcards.dataset, m)
        for m in COMPARE[(wildcards.a, wildcards.b)]
        for side, name in models.items()
    }


def compare_store_args(wildcards, input):
    """`vlmlayers compare` flags: --image A_STORE B_STORE, --text A_STORE B_STORE."""
    return " ".join(
        f"--{m} {shlex.quote(input[f'a_{m}'])} {shlex.quote(input[f'b_{m}'])}"
        for m in COMPARE[(wildcards.a, wildcards.b)]
    )
