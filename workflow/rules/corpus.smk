# Across datasets: deduplicate, build the Parquet corpus (DATACARD.md + detected-genes plot) and validate it.


rule corpus_config:
    output:
        f"{WORK}/configs/all.yaml",
    params:
        config=curation_config(DATASETS),
    log:
        f"{LOGS}/corpus_config.log",
    localrule: True
    run:
        write_yaml(params.config, output[0], log[0])


rule dedup:
    input:
        config=f"{WORK}/configs/all.yaml",
        samples=[f"{WORK}/curated/{name}/samples.parquet" for name in DATASETS],
        phenoprint=[f"{WORK}/curated/{name}/phenoprint.parquet" for name in PHENOPRINT_DATASETS],
    output:
        removed=f"{WORK}/dedup/removed.parquet",
        report=f"{WORK}/dedup/report.json",
    params:
        quiet=QUIET,
    log:
        f"{LOGS}/dedup.log",
    benchmark:
        f"{BENCH}/dedup.tsv"
    threads: 1
    resources:
        mem_mb=16000,
        runtime=6 * 60,
    conda:
        "../envs/curation.yaml"
    shell:
        "python -m curation {params.quiet} dedup --config {input.config} > {log} 2>&1"


rule build_corpus:
    input:
        config=f"{WORK}/configs/all.yaml",
        dedup=f"{WORK}/dedup/removed.parquet",
    output:
        manifest=f"{CORPUS}/manifest.json",
        datacard=report(
            f"{CORPUS}/DATACARD.md",
            caption="../report/datacard.rst",
            category="1. Corpus",
            labels={"figure": "DATACARD.md"},
        ),
        detected=report(
            f"{CORPUS}/detected_genes.png",
            caption="../report/detected_genes.rst",
            category="1. Corpus",
            labels={"figure": "genes detected per sample"},
        ),
    params:
        quiet=QUIET,
        corpus=lambda wildcards, output: os.path.dirname(output.manifest),
    log:
        f"{LOGS}/build_corpus.log",
    benchmark:
        f"{BENCH}/build_corpus.tsv"
    threads: 1
    resources:
        mem_mb=16000,
        runtime=12 * 60,
    conda:
        "../envs/curation.yaml"
    shell:
        "(python -m curation {params.quiet} build-corpus --config {input.config} --out {params.corpus} "
        "&& python -m curation validate {params.corpus}) > {log} 2>&1"
