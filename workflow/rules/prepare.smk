# Bring-your-own data: a dataset or benchmark given by `source` (COCO captions, a hub dataset,
# a CSV ...) becomes one self-contained contract Parquet that every stage reads.


rule prepare_data:
    input:
        source_inputs,
    output:
        prepared("{dataset}"),
    log:
        "logs/prepare/{dataset}.log",
    cache: "omit-software"
    conda:
        "../../envs/torch.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
    params:
        key=cache_key,
        args=prepare_args,
        code=code_version("prepare.py", "data.py"),
    shell:
        "vlmlayers prepare {params.args} --out {output:q} > {log:q} 2>&1"
