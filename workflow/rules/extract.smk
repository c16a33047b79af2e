rule extract:
    input:
        model=model_input,
        data=lambda wc: DATASETS[wc.dataset]["path"],
    output:
        directory(f"{RESULTS}/activations/{{model}}/{{dataset}}/{{modality}}"),
    log:
        "logs/extract/{model}/{dataset}/{modality}.log",
    wildcard_constraints:
        modality="image|text",
    cache: "omit-software"
    conda:
        "../../envs/torch.yaml"
    threads: THREADS
    resources:
        mem_mb=16000,
        runtime=120,
        gpu=lambda wc: 0 if WORLD else 1,
    params:
        key=cache_key,
        n_captions=config["prompt"]["n_captions"],
        spec=lambda wc: spec_args(wc.model),
        dtype=lambda wc: model_dtype(wc.model, config["extract"]["dtype"]),
        x=config["extract"],
        entropy=(
            "--prompt-entropy"
            if config["extract"]["prompt_entropy"]
            else "--no-prompt-entropy"
        ),
        bad=lambda wc: DATASETS[wc.dataset].get("on_bad_rows", "error"),
        code=code_version(
            "extract.py",
            "activations.py",
            "prompts.py",
            "models.py",
            *(["entropy.py"] if config["extract"]["prompt_entropy"] else []),
        ),
    shell:
        "VLMLAYERS_THREADS={threads} vlmlayers extract --model {wildcards.model:q} "
        "{params.spec} --data {input.data:q} "
        "--modality {wildcards.modality:q} --out {output:q} --poolings {params.x[poolings]} "
        "--taps {params.x[taps]} {params.entropy} "
        "--n-captions {params.n_captions} --batch-size {params.x[batch_size]} "
        "--shard-size {params.x[shard_size]} --store-dtype {params.x[store_dtype]} "
        "--dtype {params.dtype} --on-bad-rows {params.bad} > {log:q} 2>&1"
