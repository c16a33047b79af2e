# vlmlayers: where does visual instruction tuning put image meaning inside an LLM's layers?
# Rules are thin: each runs one `vlmlayers <stage>` sub-command (logic in src/vlmlayers/).
from snakemake.utils import min_version

min_version("9.20")


configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/world.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/extract.smk"
include: "workflow/rules/analysis.smk"
include: "workflow/rules/plots.smk"


rule all:
    default_target: True
    input:
        all_targets(),
