# Raw data: (demo) simulate the sources, then resolve and fetch each source into <raw>/<source>/.
# download.json is written last by `python -m curation.sources fetch`, so its presence means "complete and
# verified". Only the fetch spec is a parameter here: changing QC or any curation setting never re-downloads.


if SIMULATED is not None:

    rule simulate_sources:
        output:
            manifest=f"{SIMULATED}/datasets.yaml",
            truth=f"{SIMULATED}/truth.json",
        params:
            out=lambda wildcards, output: os.path.dirname(output.manifest),
            seed=config["simulate"]["seed"],
            scale=config["simulate"]["scale"],
        log:
            f"{LOGS}/simulate_sources.log",
        benchmark:
            f"{BENCH}/simulate_sources.tsv"
        threads: 1
        resources:
            mem_mb=2000,
            runtime=30,
        shell:
            "python -m simulation --quiet sources --out {params.out} --seed {params.seed} "
            "--scale {params.scale} > {log} 2>&1"


rule fetch_source:
    input:
        # The demo's sources are served from the simulated directory (file:// URLs).
        [f"{SIMULATED}/truth.json"] if SIMULATED is not None else [],
    output:
        f"{RAW}/{{source}}/download.json",
    params:
        spec=lambda wildcards: json.dumps(FETCH[wildcards.source], sort_keys=True),
        out=lambda wildcards, output: os.path.dirname(output[0]),
        retries=config["download"]["retries"],
        timeout=config["download"]["timeout_s"],
        workers=config["download"]["workers"],
        quiet=QUIET,
    wildcard_constraints:
        source="|".join(re.escape(name) for name in FETCH),
    log:
        f"{LOGS}/fetch_source/{{source}}.log",
    benchmark:
        f"{BENCH}/fetch_source/{{source}}.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=24 * 60,
        downloads=1,
    retries: 2
    shell:
        "python -m curation.sources {params.quiet} fetch --name {wildcards.source} --spec {params.spec:q} "
        "--out {params.out} --retries {params.retries} --timeout {params.timeout} --workers {params.workers} "
        "> {log} 2>&1"
