# Figures (report outputs with captions) and the claims table. They read small tables, so they run
# where Snakemake runs (`localrule`), not as cluster jobs that each wait in the queue.


for kind in figure_kinds():

    rule:
        name:
            f"figure_{kind}"
        input:
            tables=analysis_tables(FIGURES[kind]),
        output:
            png=report(
                f"{RESULTS}/figures/{kind}.png",
                caption=f"../report/{kind}.rst",
                category="Figures",
            ),
            svg=f"{RESULTS}/figures/{kind}.svg",
        log:
            f"logs/figures/{kind}.log",
        localrule: True
        conda:
            "../../envs/plot.yaml"
        threads: 1
        resources:
            mem_mb=2000,
            runtime=10,
        params:
            kind=kind,
            roles=roles_args(),
            code=code_version("plots.py"),
        shell:
            "vlmlayers plot --figure {params.kind} --table {input.tables:q} --out {output.png:q} "
            "{params.roles} > {log:q} 2>&1"


rule claims:
    input:
        geometry=analysis_tables("geometry"),
        probe=analysis_tables("probe"),
        eval=analysis_tables("eval"),
        intervention=analysis_tables("intervention"),
        finetune=analysis_tables("finetune"),
    output:
        parquet=f"{RESULTS}/claims.parquet",
        md=report(
            f"{RESULTS}/claims.md", caption="../report/claims.rst", category="Claims"
        ),
        criteria=f"{RESULTS}/claims.criteria.json",
    log:
        "logs/claims.log",
    localrule: True
    conda:
        "../../envs/plot.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        roles=roles_args(),
        criteria=json.dumps({"claims": config["claims"]}),
        code=code_version("claims.py"),
    shell:
        "printf '%s' {params.criteria:q} > {output.criteria:q} && "
        "vlmlayers claims --geometry {input.geometry:q} --probe {input.probe:q} "
        "--eval {input.eval:q} --intervention {input.intervention:q} --finetune {input.finetune:q} --criteria {output.criteria:q} {params.roles} "
        "--out-parquet {output.parquet:q} --out-md {output.md:q} > {log:q} 2>&1"
