# One job per scheme and seed (train.seeds). Checkpoints (checkpoints/train/{scheme}/seed{seed}/
# last.pt and prev.pt) are deliberately no output of either engine:
# both delete a job's outputs before rerunning it, which would defeat resuming. The stage
# resumes only from a checkpoint of the same params and data, and deletes it on success.
rule train:
    input:
        raw="data/raw",
        masks="data/masks/{scheme}",
        code=stage_code("train"),
    output:
        model=directory("models/{scheme}/seed{seed}"),
        live=directory("metrics/train/{scheme}/seed{seed}"),
    params:
        **stage_params("train"),
    log:
        log_path("train", per_seed=True),
    benchmark:
        benchmark_path("train", per_seed=True)
    conda:
        "../envs/segflow.yaml"
    # train.cpu_threads: the stage's torch threads on the CPU (DVC's the same), so Snakemake
    # runs as many trainings side by side as --cores allows
    threads: config["train"]["cpu_threads"]
    resources:
        mem_mb=8000,
        runtime=720,
        # GPUs per job: the SLURM plugin requests them with --gpus (workflow/profiles/slurm
        # has the switch for CPU-only partitions); the workstation executor ignores it.
        gpu=1,
    shell:
        "python -m stages.train --params params.yaml --scheme {wildcards.scheme} "
        "--seed {wildcards.seed} --raw {input.raw} --masks {input.masks} --out {output.model} "
        "--live {output.live} --checkpoints checkpoints/train/{wildcards.scheme}/seed{wildcards.seed} "
        "> {log} 2>&1"
