# Causal interventions (intervene.runs): one sweep over layer windows per run, scored on the
# held-out benchmark against the unmodified model.


rule intervene:
    input:
        unpack(intervention_models),
        data=BENCHMARK or [],
    output:
        f"{RESULTS}/intervention/{{run}}.parquet",
    log:
        "logs/intervention/{run}.log",
    wildcard_constraints:
        run="|".join(INTERVENTIONS) or "^$",
    conda:
        "../../envs/torch.yaml"
    threads: THREADS
    resources:
        mem_mb=8000,
        runtime=120,
        gpu=lambda wc: 0 if WORLD else 1,
    params:
        args=intervention_args,
        n_captions=config["prompt"]["n_captions"],
        seed=config["seed"],
        i=config["intervene"],
        code=code_version("intervene.py", "evaluate.py", "prompts.py", "models.py"),
    shell:
        "VLMLAYERS_THREADS={threads} vlmlayers intervene {params.args} --data {input.data:q} "
        "--n-captions {params.n_captions} --batch-size {params.i[batch_size]} "
        "--max-new-tokens {params.i[max_new_tokens]} --limit {params.i[limit]} "
        "--n-boot {params.i[n_boot]} --seed {params.seed} --out {output:q} > {log:q} 2>&1"
