# vlmlayers: where does visual instruction tuning put image meaning inside an LLM's layers?
# Rules are thin: each runs one `vlmlayers <stage>` sub-command (logic in src/vlmlayers/).
from snakemake.utils import min_version

min_version("9.20")


# A --configfile replaces the default config instead of being merged into it (a merge would add
# the default's models, runs and variants to every other config); --config key=value still edits.
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/world.smk"
include: "workflow/rules/compose.smk"
include: "workflow/rules/prepare.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/extract.smk"
include: "workflow/rules/analysis.smk"
include: "workflow/rules/intervene.smk"
include: "workflow/rules/finetune.smk"
include: "workflow/rules/plots.smk"
include: "workflow/rules/summary.smk"


rule all:
    default_target: True
    input:
        all_targets(),
        rules.summary.output,
        compare_tables(),
