# Helpers shared by the rules; no rules here.
import yaml
from snakemake.exceptions import WorkflowError

from stages.lib.codedeps import stage_code

SCHEMES = list(config["schemes"])


def _refuse_config_overrides():
    # Every stage reads params.yaml itself (as under DVC), so a --config/--configfile value
    # would reach Snakemake's bookkeeping but not the stages. Refuse it instead of lying.
    with open("params.yaml") as handle:
        on_disk = yaml.safe_load(handle)
    if on_disk != config:
        raise WorkflowError(
            "the Snakemake config differs from params.yaml: segflow's stages read params.yaml, "
            "so edit params.yaml instead of passing --config or --configfile")


_refuse_config_overrides()


wildcard_constraints:
    scheme="|".join(SCHEMES),


def log_path(rule_name, per_scheme=True):
    return f"logs/{rule_name}/{{scheme}}.log" if per_scheme else f"logs/{rule_name}.log"


def benchmark_path(rule_name, per_scheme=True):
    return (f"logs/benchmark/{rule_name}/{{scheme}}.tsv" if per_scheme
            else f"logs/benchmark/{rule_name}.tsv")
