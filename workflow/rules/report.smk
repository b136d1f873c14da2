# The report compares all schemes: its inputs are every scheme's outputs, and its command
# names the folders that hold them (the scheme list comes from params.yaml, as in DVC).
rule report:
    input:
        raw="data/raw",
        masks=expand("data/masks/{scheme}", scheme=SCHEMES),
        models=expand("models/{scheme}/seed{seed}", scheme=SCHEMES, seed=SEEDS),
        predictions=expand("predictions/{scheme}/seed{seed}", scheme=SCHEMES, seed=SEEDS),
        metrics=expand(
            "metrics/{scheme}.{ext}",
            scheme=SCHEMES,
            ext=["json", "confusion.csv", "confusion.png"],
        ),
        analysis=expand("analysis/{scheme}", scheme=SCHEMES),
        compare="compare",
        benchmarks=upstream_benchmarks,
        code=stage_code("report"),
    output:
        "reports/index.html",
    params:
        **stage_params("report"),
    log:
        log_path("report", per_scheme=False),
    benchmark:
        benchmark_path("report", per_scheme=False)
    conda:
        "../envs/segflow.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
    shell:
        "python -m stages.report --params params.yaml --raw data/raw --masks data/masks "
        "--models models --predictions predictions --metrics metrics --analysis analysis "
        "--compare compare --benchmarks {input.benchmarks} --engine-paths dvc.lock logs "
        "--out {output} > {log} 2>&1"
