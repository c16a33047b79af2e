# Models composed from parts (a `compose:` entry instead of `path:`): helpers in
# common_compose.smk; the checkpoint lands where model_specs (common.smk) points every rule.


include: "common_compose.smk"


# A composed model may take a name the tiny world's rules also write (paper.yaml's `aligned`,
# with world: null): then it is the compose job's (with a world, composed_models refuses them).
ruleorder: compose > stage1 > stage2 > pretrain_base > pretrain_vision


rule compose:
    input:
        unpack(compose_inputs),
    output:
        model=directory(f"{RESULTS}/models/{{name}}"),
        digest=digest_of(f"{RESULTS}/models/{{name}}"),
    log:
        "logs/compose/{name}.log",
    wildcard_constraints:
        name="|".join(map(re.escape, COMPOSED)) or "^$",
    cache: "omit-software"
    conda:
        "../../envs/torch.yaml"
    threads: THREADS
    resources:
        # two full models in memory (7B in fp16: 2 x 14 GB), on CPU
        mem_mb=lambda wc, input: max(40000, 3 * input.size_mb),
        runtime=60,
    params:
        key=cache_key,
        args=compose_args,
        code=code_version("compose.py", "models.py"),
    shell:
        with_digest(
            "VLMLAYERS_THREADS={threads} vlmlayers compose {params.args} "
            "--out {output.model:q} > {log:q} 2>&1"
        )
