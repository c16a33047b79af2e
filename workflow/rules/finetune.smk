# Selective fine-tuning (claim 4): stage 2 with only a band of blocks trainable, per variant and
# seed; each variant's snapshots are scored on the benchmark, then gathered into one table.


rule finetune_train:
    input:
        aligned=lambda wc: checkpoint_input(FINETUNE["model"]),
        data=local_input(FINETUNE["data"]) if FINETUNE else [],
    output:
        directory(f"{RESULTS}/finetune/{{variant}}/seed{{seed}}/model"),
    log:
        "logs/finetune/{variant}/seed{seed}.train.log",
    wildcard_constraints:
        variant="|".join(config["finetune"]["variants"]) or "^$",
        seed=r"\d+",
    cache: "omit-software"
    conda:
        "../../envs/torch.yaml"
    threads: THREADS
    resources:
        mem_mb=8000,
        runtime=240,
        gpu=lambda wc: 0 if WORLD else 1,
    params:
        key=cache_key,
        band=lambda wc: config["finetune"]["variants"][wc.variant],
        data=lambda wc: FINETUNE["data"],  # read by the job even when not here
        aligned=lambda wc: MODELS[FINETUNE["model"]]["path"],
        ft=(
            {
                k: FINETUNE[k]
                for k in ("steps", "batch_size", "lr", "warmup", "snapshot_every")
            }
            if FINETUNE
            else {}
        ),
        flags=(
            " ".join(
                f"--{flag.replace('_', '-')}"
                for flag in ("freeze_projector", "bf16", "gradient_checkpointing")
                if FINETUNE[flag]
            )
            if FINETUNE
            else ""
        ),
        every=WORLD["checkpoint_every"] if WORLD else 100,
        code=code_version("finetune.py", "world/train.py", "prompts.py"),
    shell:
        "VLMLAYERS_THREADS={threads} vlmlayers finetune train --variant {wildcards.variant:q} "
        "--band {params.band} --aligned {params.aligned:q} --data {params.data:q} "
        "--steps {params.ft[steps]} --batch-size {params.ft[batch_size]} --lr {params.ft[lr]} "
        "--warmup {params.ft[warmup]} --snapshot-every {params.ft[snapshot_every]} {params.flags} "
        "--checkpoint-every {params.every} --seed {wildcards.seed:q} --out {output:q} > {log:q} 2>&1"


rule finetune_score:
    input:
        run=f"{RESULTS}/finetune/{{variant}}/seed{{seed}}/model",
        data=BENCHMARK or [],
    output:
        f"{RESULTS}/finetune/{{variant}}/seed{{seed}}.parquet",
    log:
        "logs/finetune/{variant}/seed{seed}.score.log",
    wildcard_constraints:
        variant="|".join(config["finetune"]["variants"]) or "^$",
        seed=r"\d+",
    conda:
        "../../envs/torch.yaml"
    threads: THREADS
    resources:
        mem_mb=8000,
        runtime=60,
        gpu=lambda wc: 0 if WORLD else 1,
    params:
        n_captions=config["prompt"]["n_captions"],
        e=config["evaluate"],
        ft=config["finetune"],
        code=code_version("finetune.py", "evaluate.py", "prompts.py"),
    shell:
        "VLMLAYERS_THREADS={threads} vlmlayers finetune score --run {input.run:q} "
        "--data {input.data:q} --modalities {params.ft[modalities]} "
        "--n-captions {params.n_captions} --batch-size {params.e[batch_size]} "
        "--max-new-tokens {params.e[max_new_tokens]} --limit {params.ft[limit]} "
        "--n-boot {params.ft[n_boot]} --out {output:q} > {log:q} 2>&1"


rule finetune_table:
    input:
        expand(
            f"{RESULTS}/finetune/{{variant}}/seed{{seed}}.parquet",
            variant=config["finetune"]["variants"],
            seed=config["finetune"]["seeds"],
        ),
    output:
        f"{RESULTS}/finetune.parquet",
    log:
        "logs/finetune/table.log",
    localrule: True  # gathers the variants' small tables (as the figures do)
    conda:
        "../../envs/torch.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        code=code_version("finetune.py"),
    shell:
        "vlmlayers finetune table --runs {input:q} --out {output:q} > {log:q} 2>&1"
