# segflow: COCO -> masks per label scheme -> train -> infer -> evaluate -> analyze -> report.
# Thin on purpose: the stages live in stages/, the rules in workflow/rules/, every value in
# params.yaml (validated by the same JSON Schema the stages use), every path in the rules.
from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "params.yaml"


validate(config, "workflow/schemas/params.schema.yaml")


include: "workflow/rules/common.smk"
include: "workflow/rules/download.smk"
include: "workflow/rules/masks.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/infer.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/analyze.smk"
include: "workflow/rules/compare.smk"
include: "workflow/rules/report.smk"


# Outputs DVC wrote get times Snakemake can plan with (see common.smk).
align_dvc_output_times()


rule all:
    default_target: True
    input:
        "reports/index.html",


# One engine at a time: claim the outputs in DVC's lock files for the whole run (real
# runs only; hooks never run in dry runs or inside cluster jobs). See common.smk.
onstart:
    claim_outputs()


onsuccess:
    release_outputs()


onerror:
    release_outputs()
