# Models composed from parts (a `compose:` entry instead of `path:`), e.g. LLaVA-1.5's stage 1:
# the tuned model's architecture + the base LM's weights + the stage-1 projector file. The
# checkpoint lands at {RESULTS}/models/{name}, the path every other rule reads (model_specs).
import re


def composed_models():
    """name -> compose entry of every composed model, checked against the other models."""
    composed = {}
    for name, spec in MODELS.items():
        entry = spec.get("compose")
        if not entry:
            continue
        if WORLD and name in ("base", "vision", "aligned", "tuned"):
            raise ValueError(
                f"models.{name}: the tiny world makes {RESULTS}/models/{name}; "
                "compose under another name"
            )
        for key in ("architecture", "language_model"):
            if entry[key] == name:
                raise ValueError(f"models.{name}.compose.{key}: names the model itself")
        composed[name] = entry
    return composed


COMPOSED = composed_models()


def compose_part(ref):
    """(path, revision) of a part: a model name stands for that model's checkpoint."""
    spec = MODELS.get(ref)
    return (spec["path"], spec.get("revision")) if spec else (ref, None)


def compose_inputs(wildcards):
    """The parts that are files here (a hub id is read from the Hugging Face cache)."""
    entry = COMPOSED[wildcards.name]
    return {
        "architecture": checkpoint_files(compose_part(entry["architecture"])[0]),
        "language_model": checkpoint_files(compose_part(entry["language_model"])[0]),
        "projector": local_input(entry["projector"]),
    }


def compose_args(wildcards):
    """`vlmlayers compose` flags of one composed model, shell-quoted."""
    entry = COMPOSED[wildcards.name]
    args = []
    for key in ("architecture", "language_model"):
        path, revision = compose_part(entry[key])
        flag = key.replace("_", "-")
        args += [f"--{flag}", path] + (
            [f"--{flag}-revision", revision] if revision else []
        )
    mapping = entry["projector_map"]
    if not isinstance(mapping, str):
        mapping = json.dumps(mapping, sort_keys=True)
    args += ["--projector", entry["projector"], "--projector-map", mapping]
    return shlex.join(args)
