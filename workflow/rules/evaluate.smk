rule evaluate:
    input:
        model=model_input,
        data=BENCHMARK or [],
        tasks=[f for p in config["evaluate"]["include_path"] for f in local_input(p)],
    output:
        table=f"{RESULTS}/eval/{{model}}.parquet",
        predictions=f"{RESULTS}/eval/{{model}}.predictions.parquet",
    log:
        "logs/evaluate/{model}.log",
    conda:
        "../../envs/eval.yaml"
    threads: THREADS
    resources:
        mem_mb=8000,
        runtime=60,
        gpu=lambda wc: 0 if WORLD else 1,
    params:
        n_captions=config["prompt"]["n_captions"],
        seed=config["seed"],
        spec=lambda wc: spec_args(wc.model),
        dtype=lambda wc: model_dtype(wc.model),
        e=config["evaluate"],
        lmms=lmms_args,
        code=code_version(
            "evaluate.py",
            "harness.py",
            "prompts.py",
            "models.py",
            "lmms_tasks/utils.py",
            "lmms_tasks/_vlmlayers_contract.yaml",
            "lmms_tasks/_vlmlayers_image.yaml",
            "lmms_tasks/_vlmlayers_text.yaml",
            "lmms_tasks/_vlmlayers_caption.yaml",
        ),
    shell:
        "VLMLAYERS_THREADS={threads} vlmlayers evaluate --model {wildcards.model:q} "
        "{params.spec} --dtype {params.dtype} --data {input.data:q} "
        "--n-captions {params.n_captions} --batch-size {params.e[batch_size]} "
        "--max-new-tokens {params.e[max_new_tokens]} --limit {params.e[limit]} "
        "--harness {params.e[harness]} {params.lmms} "
        "--seed {params.seed} --out {output.table:q} --predictions {output.predictions:q} "
        "> {log:q} 2>&1"
