# Helpers shared by the rules; no rules here.
import os
from types import SimpleNamespace

from snakemake.exceptions import WorkflowError
from snakemake.io import apply_wildcards

from stages.lib.codedeps import declared_params, stage_code
from stages.lib.params import SCHEME_PLACEHOLDER, lookup

# The engine glue lives beside the rules (workflow/lib/engines.py), not in the stages
# package: it serves the Snakefile. `from ... import` only: a plain `import workflow.lib`
# would rebind the name `workflow`, Snakemake's own object in this namespace.
from workflow.lib.engines import (
    EngineBusy,
    Job,
    SnakemakeClaim,
    UntestedVersion,
    align_restored_times,
    output_roots,
)

SCHEMES = list(config["schemes"])
# Each scheme is trained, inferred and evaluated once per seed; the first seed's model is the
# one analysed (and the report's).
SEEDS = list(config["train"]["seeds"])
FIRST_SEED = SEEDS[0]


# Each rule's `params:` are the keys its stage module declares in PARAMS (the stage reads
# nothing else: stages.lib.params.select), so Snakemake's params trigger reruns a job exactly
# when a value it reads changes. "schemes.{scheme}" is the job's own scheme.
def stage_params(stage):
    values = {}
    for key in declared_params(stage):
        if SCHEME_PLACEHOLDER in key:
            name = key.split(".")[0].removesuffix("s")
            values[name] = lambda wildcards, key=key: lookup(
                config, key.replace(SCHEME_PLACEHOLDER, wildcards.scheme)
            )
        else:
            values[key.replace(".", "_")] = lookup(config, key)
    return values


def _refuse_config_overrides():
    # Every stage reads params.yaml itself (as under DVC), so a --config/--configfile value
    # would reach Snakemake's bookkeeping but not the stages. Refuse it instead of lying.
    # PARAMS: params.yaml as the stages read it, checked in the Snakefile.
    if PARAMS != config:
        raise WorkflowError(
            "the Snakemake config differs from params.yaml: segflow's stages read params.yaml, "
            "so edit params.yaml instead of passing --config or --configfile"
        )


_refuse_config_overrides()


wildcard_constraints:
    scheme="|".join(SCHEMES),
    seed="|".join(str(seed) for seed in SEEDS),


# A job's file name: per scheme and seed, per scheme, or one for the rule.
def _job_name(per_scheme, per_seed):
    if per_seed:
        return "{scheme}/seed{seed}"
    return "{scheme}" if per_scheme else None


def log_path(rule_name, per_scheme=True, per_seed=False):
    name = _job_name(per_scheme, per_seed)
    return f"logs/{rule_name}/{name}.log" if name else f"logs/{rule_name}.log"


def benchmark_path(rule_name, per_scheme=True, per_seed=False):
    name = _job_name(per_scheme, per_seed)
    return f"logs/benchmark/{rule_name}/{name}.tsv" if name else f"logs/benchmark/{rule_name}.tsv"


# The wildcard values of every job of a rule: per scheme and seed, per scheme, or one job.
def job_wildcards(wildcard_names):
    if "seed" in wildcard_names:
        return [{"scheme": sc, "seed": str(se)} for sc in SCHEMES for se in SEEDS]
    if "scheme" in wildcard_names:
        return [{"scheme": sc} for sc in SCHEMES]
    return [{}]


# The stages the report shows the wall time of (the report reads them per job).
UPSTREAM_JOBS = ["download", "masks", "train", "infer", "evaluate", "analyze", "compare"]


# The upstream jobs' benchmark files: the report's stage times, declared inputs (a rule's
# benchmark file is one of its products, so Snakemake knows which job writes it). A job whose
# outputs exist without a benchmark file ran under DVC, which records no times: demanding
# its file would make Snakemake rerun that job only to time it, so it is left out.
def upstream_benchmarks(wildcards):
    paths = []
    for stage in UPSTREAM_JOBS:
        step = getattr(rules, stage).rule
        for values in job_wildcards(step.wildcard_names):
            path = apply_wildcards(str(step.benchmark), values)
            made = all(os.path.exists(apply_wildcards(str(o), values)) for o in step.output)
            if os.path.exists(path) or not made:
                paths.append(path)
    return paths


# ---------------------------------------------------------------- file times of DVC's outputs
# Snakemake reruns a job when an input is newer than its oldest output, and `dvc pull`,
# `dvc checkout` and `dvc repro` write outputs at times that say nothing about the
# pipeline's order. Before Snakemake plans anything, outputs it did not write itself and
# that `dvc status` vouches for get the time of their newest input (workflow/lib/engines.py
# says why and when). Leaving `mtime` out of --rerun-triggers would not help: Snakemake
# 9.x compares input times whatever the triggers say.
def workflow_jobs():
    jobs = []
    for step in workflow.rules:
        if step.name == "all":
            continue
        for values in job_wildcards(step.wildcard_names):
            name = "-".join(values[k] for k in ("scheme", "seed") if k in values)
            jobs.append(
                Job(
                    f"{step.name}@{name}" if name else step.name,
                    job_paths(step.input, values),
                    job_paths(step.output, values),
                )
            )
    return jobs


# A rule's files for one job. An input function (the report's upstream_benchmarks) is
# called for its paths: its string form is no file, and a missing input stops alignment.
def job_paths(items, values):
    paths = []
    for item in items:
        found = item(SimpleNamespace(**values)) if callable(item) else [item]
        paths += [apply_wildcards(str(i), values) for i in found]
    return paths


def align_dvc_output_times():
    if workflow.is_main_process:
        try:
            align_restored_times(workflow.basedir, workflow_jobs())
        except UntestedVersion as exc:
            raise WorkflowError(str(exc)) from None


# ---------------------------------------------------------------- one engine at a time
# A Snakemake run claims every output folder in DVC's lock files, so DVC refuses to touch
# them while it runs, and Snakemake refuses to start while DVC runs (workflow/lib/engines.py).
def workflow_outputs():
    return output_roots([str(pattern) for r in workflow.rules for pattern in r.output])


ENGINE_CLAIM = None


def claim_outputs():
    global ENGINE_CLAIM
    ENGINE_CLAIM = SnakemakeClaim(workflow.basedir, workflow_outputs())
    try:
        ENGINE_CLAIM.acquire()
    except (EngineBusy, UntestedVersion) as exc:
        ENGINE_CLAIM = None
        raise WorkflowError(str(exc)) from None


def release_outputs():
    if ENGINE_CLAIM is not None:
        ENGINE_CLAIM.release()
