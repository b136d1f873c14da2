# segflow: COCO -> masks per label scheme -> train -> infer -> evaluate -> analyze -> report.
# Thin on purpose: the stages live in stages/, the rules in workflow/rules/, every value in
# params.yaml (validated by the same JSON Schema the stages use), every path in the rules.
import sys

from snakemake.utils import min_version

from stages.lib.params import ParamsError, load_params

min_version("9.0")

# The stages' own checked loader and validator, before Snakemake reads the file: its YAML
# loader takes duplicate keys and expands alias bombs, its validator takes 1.0 for an
# integer. Refused like a stage refuses: one line, exit code 2 (a WorkflowError would add
# Snakemake's location and traceback lines).
try:
    PARAMS = load_params("params.yaml")
except ParamsError as exc:
    print(exc, file=sys.stderr)
    sys.exit(2)


# Still read by Snakemake, for its params bookkeeping (common.smk refuses overrides).
configfile: "params.yaml"


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
