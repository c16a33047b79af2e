rule probe:
    input:
        unpack(stores),
        labels=lambda wc: DATASETS[wc.dataset]["path"],
    output:
        f"{RESULTS}/probe/{{model}}/{{dataset}}.parquet",
    log:
        "logs/probe/{model}/{dataset}.log",
    conda:
        "../../envs/torch.yaml"
    threads: THREADS
    resources:
        mem_mb=8000,
        runtime=60,
    params:
        stores=store_args,
        p=config["probe"],
        code=code_version("probe.py", "activations.py", "stats.py"),
    shell:
        "VLMLAYERS_THREADS={threads} vlmlayers probe --model {wildcards.model:q} {params.stores} "
        "--labels {input.labels:q} --poolings {params.p[poolings]} --seeds {params.p[seeds]} "
        "--test-fraction {params.p[test_fraction]} --l2 {params.p[l2]} "
        "--n-boot {params.p[n_boot]} --out {output:q} > {log:q} 2>&1"


rule geometry:
    input:
        unpack(stores),
        labels=lambda wc: DATASETS[wc.dataset]["path"],
    output:
        f"{RESULTS}/geometry/{{model}}/{{dataset}}.parquet",
    log:
        "logs/geometry/{model}/{dataset}.log",
    conda:
        "../../envs/torch.yaml"
    threads: THREADS
    resources:
        mem_mb=8000,
        runtime=60,
    params:
        seed=config["seed"],
        stores=store_args,
        g=config["geometry"],
        baseline=lambda wc: (
            f"--baseline-label {shlex.quote(config['geometry']['baseline_label'])}"
            if config["geometry"]["baseline_label"]
            else ""
        ),
        heads="--heads" if config["geometry"]["heads"] else "",
        code=code_version("geometry.py", "activations.py", "stats.py"),
    shell:
        "VLMLAYERS_THREADS={threads} vlmlayers geometry --model {wildcards.model:q} "
        "{params.stores} --labels {input.labels:q} --poolings {params.g[poolings]} "
        "--k {params.g[k]} --gride-range-max {params.g[gride_range_max]} "
        "--twonn-range-max {params.g[twonn_range_max]} {params.baseline} "
        "--taps {params.g[taps]} {params.heads} --n-boot {params.g[n_boot]} "
        "--n-permutations {params.g[n_permutations]} --adp-z {params.g[adp_z]} "
        "--seed {params.seed} --out {output:q} > {log:q} 2>&1"


rule compare:
    input:
        unpack(compare_stores),
    output:
        f"{RESULTS}/compare/{{a}}~{{b}}/{{dataset}}.parquet",
    log:
        "logs/compare/{a}~{b}/{dataset}.log",
    wildcard_constraints:
        a=r"[^/~]+",
        b=r"[^/~]+",
    conda:
        "../../envs/torch.yaml"
    threads: THREADS
    resources:
        mem_mb=8000,
        runtime=60,
    params:
        seed=config["seed"],
        stores=compare_store_args,
        c=config["compare"],
        code=code_version("compare.py", "geometry.py", "activations.py", "stats.py"),
    shell:
        "VLMLAYERS_THREADS={threads} vlmlayers compare --models {wildcards.a:q} {wildcards.b:q} "
        "{params.stores} --poolings {params.c[poolings]} --k {params.c[k]} "
        "--svcca-variance {params.c[svcca_variance]} --n-boot {params.c[n_boot]} "
        "--seed {params.seed} --out {output:q} > {log:q} 2>&1"
