# The schemes against each other: every scheme's analysis in, one comparison folder out
# (its command names the analysis folder; the scheme list comes from params.yaml, as in DVC).
rule compare:
    input:
        analysis=expand("analysis/{scheme}", scheme=SCHEMES),
        per_image=expand("metrics/{scheme}.per_image.npz", scheme=SCHEMES),
        code=stage_code("compare"),
    output:
        directory("compare"),
    params:
        **stage_params("compare"),
    log:
        log_path("compare", per_scheme=False),
    benchmark:
        benchmark_path("compare", per_scheme=False)
    conda:
        "../envs/segflow.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    shell:
        "python -m stages.compare --params params.yaml --analysis analysis --metrics metrics "
        "--out {output} > {log} 2>&1"
