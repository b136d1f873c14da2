rule infer:
    input:
        model="models/{scheme}/seed{seed}",
        raw="data/raw",
        masks="data/masks/{scheme}",
        code=stage_code("infer"),
    output:
        directory("predictions/{scheme}/seed{seed}"),
    params:
        **stage_params("infer"),
    log:
        log_path("infer", per_seed=True),
    benchmark:
        benchmark_path("infer", per_seed=True)
    conda:
        "../envs/segflow.yaml"
    threads: 2
    resources:
        mem_mb=8000,
        runtime=240,
        # GPUs per job: the SLURM plugin requests them with --gpus (workflow/profiles/slurm
        # has the switch for CPU-only partitions); the workstation executor ignores it.
        gpu=1,
    shell:
        "python -m stages.infer --params params.yaml --model {input.model} "
        "--raw {input.raw} --masks {input.masks} --out {output} > {log} 2>&1"
