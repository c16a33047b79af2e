# Report tables: benchmark scores (both prompt forms, captioning) and learning curves.


rule summary:
    input:
        eval=analysis_tables("eval"),
        finetune=analysis_tables("finetune"),
    output:
        report(
            f"{RESULTS}/summary.md", caption="../report/summary.rst", category="Tables"
        ),
    log:
        "logs/summary.log",
    localrule: True
    conda:
        "../../envs/plot.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        roles=roles_args(),
        code=code_version("summary.py"),
    shell:
        "vlmlayers summary --eval {input.eval:q} --finetune {input.finetune:q} {params.roles} "
        "--out {output:q} > {log:q} 2>&1"
