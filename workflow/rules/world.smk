# The tiny world: data, then base LM + vision tower (shipped, or pretrained here),
# then LLaVA stage 1 (aligned) and stage 2 (tuned).


rule world:
    output:
        multiext(
            f"{RESULTS}/world/",
            "train.parquet",
            "test.parquet",
            "analysis.parquet",
            "corpus.parquet",
            "world.json",
        ),
    log:
        "logs/world.log",
    cache: "omit-software"
    conda:
        "../../envs/torch.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=20,
    params:
        n_captions=config["prompt"]["n_captions"],
        out=lambda wc, output: os.path.dirname(output[0]),
        # the data settings only: a training setting must not remake (and rerun) the world
        w=({k: WORLD[k] for k in WORLD_DATA_KEYS} if WORLD else {}),
        code=code_version("world/scenes.py", "world/chat.py", "prompts.py"),
    shell:
        "vlmlayers world --out {params.out:q} --seed {params.w[seed]} "
        "--image-size {params.w[image_size]} --n-train {params.w[n_train]} "
        "--n-test {params.w[n_test]} --n-analysis {params.w[n_analysis]} "
        "--n-corpus {params.w[n_corpus]} --n-heldout-pairs {params.w[n_heldout_pairs]} "
        "--n-captions {params.n_captions} > {log:q} 2>&1"


rule pretrain_base:
    input:
        world=f"{RESULTS}/world/corpus.parquet",
        heldout=f"{RESULTS}/world/test.parquet",  # scored into the manifest's final metrics
        settings=f"{RESULTS}/world/world.json",
    output:
        model=directory(f"{RESULTS}/models/base"),
        digest=digest_of(f"{RESULTS}/models/base"),
    log:
        "logs/pretrain_base.log",
    cache: "omit-software"
    conda:
        "../../envs/torch.yaml"
    threads: THREADS
    resources:
        mem_mb=4000,
        # the shipped budget: 5.5 minutes on one GPU for its first 4,250 steps (chat, relation
        # and column tuning's 1,200 were run on CPU), 4.2 hours on 2 CPU cores
        runtime=30 if WORLD_GPU else 300,
        gpu=WORLD_GPU,
    params:
        seed=config["seed"],
        world=lambda wc, input: os.path.dirname(input.world),
        args=training_flags(WORLD["base_lm"], CONFIG_SCHEMA) if WORLD else "",
        every=checkpoint_every("base_lm"),
        code=code_version(
            "world/train.py",
            "world/tokenizer.py",
            "world/scenes.py",
            "world/chat.py",
            "prompts.py",
        ),
    shell:
        with_digest(
            "VLMLAYERS_THREADS={threads} vlmlayers train base --world {params.world:q} "
            "--out {output.model:q} {params.args} --seed {params.seed} "
            "--checkpoint-every {params.every} > {log:q} 2>&1"
        )


rule pretrain_vision:
    output:
        model=directory(f"{RESULTS}/models/vision"),
        digest=digest_of(f"{RESULTS}/models/vision"),
    log:
        "logs/pretrain_vision.log",
    cache: "omit-software"
    conda:
        "../../envs/torch.yaml"
    threads: THREADS
    resources:
        mem_mb=4000,
        runtime=60,
        gpu=WORLD_GPU,
    params:
        seed=config["seed"],
        args=training_flags(WORLD["vision"], CONFIG_SCHEMA) if WORLD else "",
        every=checkpoint_every("vision"),
        size=(
            f"--image-size {WORLD['image_size']} --patch {WORLD['patch_size']}"
            if WORLD
            else ""
        ),
        code=code_version("world/train.py", "world/scenes.py"),
    shell:
        with_digest(
            "VLMLAYERS_THREADS={threads} vlmlayers train vision --out {output.model:q} "
            "{params.args} {params.size} --seed {params.seed} "
            "--checkpoint-every {params.every} > {log:q} 2>&1"
        )


rule stage1:
    input:
        world=f"{RESULTS}/world/train.parquet",
        base=checkpoint_files(pretrained("base")),
        vision=checkpoint_files(pretrained("vision")),
    output:
        model=directory(f"{RESULTS}/models/aligned"),
        digest=digest_of(f"{RESULTS}/models/aligned"),
    log:
        "logs/stage1.log",
    cache: "omit-software"
    conda:
        "../../envs/torch.yaml"
    threads: THREADS
    resources:
        mem_mb=4000,
        runtime=60,
        gpu=WORLD_GPU,
    params:
        seed=config["seed"],
        world=lambda wc, input: os.path.dirname(input.world),
        base=lambda wc: pretrained("base"),
        vision=lambda wc: pretrained("vision"),
        args=training_flags(WORLD["stage1"], CONFIG_SCHEMA) if WORLD else "",
        every=checkpoint_every("stage1"),
        size=(
            f"--image-size {WORLD['image_size']} --patch {WORLD['patch_size']}"
            if WORLD
            else ""
        ),
        code=code_version("world/train.py", "prompts.py"),
    shell:
        with_digest(
            "VLMLAYERS_THREADS={threads} vlmlayers train stage1 --world {params.world:q} "
            "--base {params.base:q} --vision {params.vision:q} --out {output.model:q} "
            "{params.args} {params.size} --seed {params.seed} "
            "--checkpoint-every {params.every} > {log:q} 2>&1"
        )


rule stage2:
    input:
        world=f"{RESULTS}/world/train.parquet",
        aligned=digest_of(f"{RESULTS}/models/aligned"),
    output:
        model=directory(f"{RESULTS}/models/tuned"),
        digest=digest_of(f"{RESULTS}/models/tuned"),
    log:
        "logs/stage2.log",
    cache: "omit-software"
    conda:
        "../../envs/torch.yaml"
    threads: THREADS
    resources:
        mem_mb=4000,
        runtime=60,
        gpu=WORLD_GPU,
    params:
        seed=config["seed"],
        world=lambda wc, input: os.path.dirname(input.world),
        aligned=lambda wc: f"{RESULTS}/models/aligned",
        args=training_flags(WORLD["stage2"], CONFIG_SCHEMA) if WORLD else "",
        every=checkpoint_every("stage2"),
        code=code_version("world/train.py", "prompts.py"),
    shell:
        with_digest(
            "VLMLAYERS_THREADS={threads} vlmlayers train stage2 --world {params.world:q} "
            "--aligned {params.aligned:q} --out {output.model:q} {params.args} "
            "--seed {params.seed} --checkpoint-every {params.every} > {log:q} 2>&1"
        )
