"""The Snakemake workflow: offline dry runs of the real build, lint, the SLURM profile, the prebuilt-corpus
config, config validation, rerun triggers, the training launcher, and (slow) the offline demo end to end."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
SNAKEFILE = REPO / "workflow" / "Snakefile"
BIN = Path(sys.executable).parent
NINE = {"replogle_k562_gwps", "gbmap", "mixseq", "sciplex3", "gastric_metaplasia", "tme_atlas", "wu_brca", "tcga", "gtex"}

sys.path.insert(0, str(REPO / "workflow" / "scripts"))
import train_run  # noqa: E402


def snakemake(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    """Run snakemake from the repository root with this interpreter's environment first on PATH."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run([str(BIN / "snakemake"), "-s", str(SNAKEFILE), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def jobs(result: subprocess.CompletedProcess) -> dict[str, int]:
    """rule -> job count from the "Job stats" table of a dry run."""
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    table = (result.stdout + result.stderr).split("Job stats:")[1].split("total")[0]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)\s*$", table, re.M)}


def dry_run_wildcards(result: subprocess.CompletedProcess, rule: str) -> set[str]:
    """The wildcard values of every job of ``rule`` in a dry run's job listing."""
    text = result.stdout + result.stderr
    blocks = re.split(r"\n(?=(?:local)?rule \w+:)", text)
    found = set()
    for block in blocks:
        if re.match(rf"(?:local)?rule {rule}:", block.strip()):
            m = re.search(r"wildcards: \w+=([\w.-]+)", block)
            if m:
                found.add(m.group(1))
    return found


def write_config(path: Path, base: str, **changes) -> Path:
    """A copy of config/<base> with top-level keys replaced (nested dicts replaced wholesale)."""
    config = yaml.safe_load((REPO / "config" / base).read_text())
    config.update(changes)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def test_real_build_dry_run_is_offline_and_lists_all_nine_sources(tmp_path):
    config = write_config(tmp_path / "real.yaml", "config.yaml", results_dir=str(tmp_path / "results"))
    result = snakemake("-n", "--cores", "4", "--nolock", "--configfile", str(config))
    counts = jobs(result)
    assert counts["curate_dataset"] == 9 and counts["fetch_source"] == 12  # nine sources + three screens
    assert counts["phenoprint_dataset"] == 1 and counts["evaluate_screen"] == 3 and counts["train_model"] == 1
    assert dry_run_wildcards(result, "curate_dataset") == NINE
    assert dry_run_wildcards(result, "phenoprint_dataset") == {"replogle_k562_gwps"}
    assert dry_run_wildcards(result, "evaluate_screen") == {"replogle_rpe1_essential", "nadig_hepg2", "nadig_jurkat"}
    assert not (tmp_path / "results").exists()  # parsing and dry-running wrote nothing


@pytest.mark.parametrize("configfile", ["config/demo.yaml", "config/config.yaml"])
def test_lint_is_clean(configfile):
    result = snakemake("--lint", "--nolock", "--configfile", configfile)
    text = result.stdout + result.stderr
    assert result.returncode == 0, text
    assert "Lints for" not in text and re.findall(r"^\s+\* ", text, re.M) == [], text


def test_every_shell_rule_names_an_existing_conda_env():
    """--software-deployment-method conda needs an env file per rule group; each one must parse and pin torch."""
    envs = {path.name: yaml.safe_load(path.read_text()) for path in (REPO / "workflow" / "envs").glob("*.yaml")}
    assert {"curation.yaml", "txfm.yaml"} <= set(envs)
    for env in envs.values():
        assert "python=3.11" in env["dependencies"]
    pip = [item["pip"] for item in envs["txfm.yaml"]["dependencies"] if isinstance(item, dict)][0]
    assert "torch==2.13.0" in pip
    for rules in (REPO / "workflow" / "rules").glob("*.smk"):
        for name in re.findall(r'conda:\s*\n\s*"\.\./envs/([^"]+)"', rules.read_text()):
            assert name in envs, f"{rules.name}: conda env {name} missing"


def test_slurm_profile_dry_run_requests_gpus_for_training(tmp_path):
    config = write_config(tmp_path / "real.yaml", "config.yaml", results_dir=str(tmp_path / "results"))
    result = snakemake("-n", "--nolock", "--profile", "workflow/profiles/slurm", "--configfile", str(config))
    counts = jobs(result)
    assert counts["train_model"] == 1 and counts["curate_dataset"] == 9
    train_block = (result.stdout + result.stderr).split("rule train_model:")[1].split("\n\n")[0]
    assert "gpu=8" in train_block and "slurm_partition=gpu" in train_block


def test_prebuilt_corpus_runs_only_training(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "manifest.json").write_text("{}")
    config = write_config(tmp_path / "prebuilt.yaml", "demo.yaml", results_dir=str(tmp_path / "results"),
                          prebuilt_corpus=True, corpus_dir=str(corpus), evaluate={"enabled": False})
    counts = jobs(snakemake("-n", "--cores", "2", "--nolock", "--configfile", str(config)))
    assert counts == {"train_model": 1, "report_training": 1, "all": 1}


def test_wrong_configs_fail_while_parsing_with_a_clear_message(tmp_path):
    bad_schema = write_config(tmp_path / "a.yaml", "demo.yaml", train={"gpus": -1})
    result = snakemake("-n", "--nolock", "--configfile", str(bad_schema))
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "-1 is less than the minimum of 0" in output and "['train']['gpus']" in output
    demo = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
    demo["sources"]["sim_gtex"]["format"] = "gctx"
    bad_entry = tmp_path / "b.yaml"
    bad_entry.write_text(yaml.safe_dump(demo))
    result = snakemake("-n", "--nolock", "--configfile", str(bad_entry))
    assert result.returncode != 0 and "datasets.sim_gtex.format: 'gctx' is not one of" in result.stdout + result.stderr
    unknown = write_config(tmp_path / "c.yaml", "config.yaml", sources={"not_a_source": {}})
    result = snakemake("-n", "--nolock", "--configfile", str(unknown))
    assert result.returncode != 0 and "sources.not_a_source: not in the manifest" in result.stdout + result.stderr


def test_train_launcher_resumes_only_an_identical_run(tmp_path):
    corpus, run, cfg = tmp_path / "corpus", tmp_path / "run", tmp_path / "t.yaml"
    corpus.mkdir()
    (corpus / "manifest.json").write_text('{"n": 1}')
    cfg.write_text("preset: tiny\nlr: 1.0e-3\n")
    first = train_run.fingerprint(cfg, ["max_steps=5"], 0, corpus)
    assert train_run.prepare_run_dir(run, first) is False and run.is_dir()
    # a checkpoint left by a killed job with the same settings: resume
    step = run / "checkpoints" / "step-000002"
    step.mkdir(parents=True)
    (step / "trainer_state.pt").write_bytes(b"x")
    (step / "model.safetensors").write_bytes(b"x")
    (run / "checkpoints" / "last").write_text("step-000002")
    assert train_run.prepare_run_dir(run, first) is True
    assert train_run.train_command(corpus, run, cfg, ["max_steps=5"], 1, True)[-2:] == ["--resume", "max_steps=5"]
    # changed settings: the old run is kept aside and training starts over
    cfg.write_text("preset: tiny\nlr: 3.0e-4\n")
    second = train_run.fingerprint(cfg, ["max_steps=5"], 0, corpus)
    assert second != first and train_run.prepare_run_dir(run, second) is False
    assert (tmp_path / "run.previous" / "checkpoints" / "last").is_file() and not (run / "checkpoints").exists()
    command = train_run.train_command(corpus, run, cfg, [], 4, False)
    assert command[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4", "-m"]


@pytest.mark.slow
def test_demo_end_to_end_then_nothing_to_do_then_qc_change_reruns_downstream_only(tmp_path):
    demo = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
    demo["results_dir"] = str(tmp_path / "wf")
    demo["simulate"]["out"] = str(tmp_path / "simulated")
    config = tmp_path / "demo.yaml"
    config.write_text(yaml.safe_dump(demo, sort_keys=False))

    result = snakemake("--profile", "workflow/profiles/local", "--configfile", str(config), timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    wf = tmp_path / "wf"
    manifest = json.loads((wf / "corpus" / "manifest.json").read_text())
    assert set(manifest["datasets"]) == set(demo["sources"]) and manifest["n_samples"] > 0
    assert (wf / "corpus" / "DATACARD.md").is_file() and (wf / "corpus" / "detected_genes.png").is_file()
    trained = json.loads((wf / "train" / "tiny" / "train_result.json").read_text())
    assert trained["step"] == demo["train"]["overrides"]["max_steps"]
    assert (wf / "train" / "tiny" / trained["checkpoint"] / "model.safetensors").is_file()
    for download in (wf / "raw").glob("*/download.json"):
        assert all(f["url"].startswith("file://") for f in json.loads(download.read_text())["files"])
    if (wf / "evaluate").exists():
        assert (wf / "evaluate" / "sim_eval_screen" / "results.csv").is_file()
        assert "sim_eval_screen" not in manifest["datasets"]  # the evaluation screen is held out (zero-shot)
    # the simulated sources' own datasets.yaml and this config describe the same curation entries
    simulated = yaml.safe_load((tmp_path / "simulated" / "datasets.yaml").read_text())["datasets"]
    for name, entry in simulated.items():
        ours = demo["sources"][name]
        assert ours["format"] == entry["format"] and ours["qc"] == entry["qc"], name

    report = tmp_path / "report.html"
    result = snakemake("--configfile", str(config), "--report", str(report), timeout=300)
    assert result.returncode == 0 and report.stat().st_size > 10_000, result.stderr[-2000:]

    again = snakemake("-n", "--cores", "2", "--configfile", str(config))
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr

    demo["sources"]["sim_atlas_mtx"]["qc"] = {**demo["sources"]["sim_atlas_mtx"]["qc"], "min_genes_per_cell": 160}
    config.write_text(yaml.safe_dump(demo, sort_keys=False))
    changed = snakemake("-n", "--cores", "2", "--rerun-triggers", "params", "mtime", "input",
                        "--configfile", str(config))
    counts = jobs(changed)
    assert "fetch_source" not in counts and "simulate_sources" not in counts
    assert dry_run_wildcards(changed, "dataset_config") == {"sim_atlas_mtx"}
    assert dry_run_wildcards(changed, "curate_dataset") == {"sim_atlas_mtx"}
    assert {"corpus_config", "dedup", "build_corpus", "train_model"} <= set(counts)
