# Per-dataset curation: a generated one-dataset curation config (its content is a rule parameter, so editing a
# dataset's QC reruns that dataset's config, curation and everything downstream — but not its download),
# then `python -m curation curate` and, where enabled, `python -m curation phenoprint`.


rule dataset_config:
    output:
        f"{WORK}/configs/{{dataset}}.yaml",
    params:
        config=lambda wildcards: curation_config([wildcards.dataset]),
    wildcard_constraints:
        dataset="|".join(re.escape(name) for name in DATASETS),
    log:
        f"{LOGS}/dataset_config/{{dataset}}.log",
    localrule: True
    run:
        write_yaml(params.config, output[0], log[0])


rule curate_dataset:
    input:
        config=f"{WORK}/configs/{{dataset}}.yaml",
        download=f"{RAW}/{{dataset}}/download.json",
    output:
        samples=f"{WORK}/curated/{{dataset}}/samples.parquet",
        report=f"{WORK}/curated/{{dataset}}/report.json",
    params:
        quiet=QUIET,
    log:
        f"{LOGS}/curate/{{dataset}}.log",
    benchmark:
        f"{BENCH}/curate/{{dataset}}.tsv"
    threads: 1
    resources:
        mem_mb=8000,
        runtime=12 * 60,
    conda:
        "../envs/curation.yaml"
    shell:
        "python -m curation {params.quiet} curate --config {input.config} --dataset {wildcards.dataset} "
        "> {log} 2>&1"


rule phenoprint_dataset:
    input:
        config=f"{WORK}/configs/{{dataset}}.yaml",
        samples=f"{WORK}/curated/{{dataset}}/samples.parquet",
    output:
        pruned=f"{WORK}/curated/{{dataset}}/phenoprint.parquet",
        report=f"{WORK}/curated/{{dataset}}/phenoprint.json",
    params:
        quiet=QUIET,
    log:
        f"{LOGS}/phenoprint/{{dataset}}.log",
    benchmark:
        f"{BENCH}/phenoprint/{{dataset}}.tsv"
    threads: 1
    resources:
        mem_mb=16000,
        runtime=12 * 60,
    conda:
        "../envs/curation.yaml"
    shell:
        "python -m curation {params.quiet} phenoprint --config {input.config} --dataset {wildcards.dataset} "
        "> {log} 2>&1"
