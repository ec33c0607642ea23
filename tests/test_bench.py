"""poison.bench: the strength benchmark runs the real stages, caches jobs, renders its tables."""

from __future__ import annotations

import json

import pytest
import torch

from poison import bench
from poison.cli import main
from poison.errors import ConfigError
from conftest import tiny_params, tiny_params_dict

CFG = bench.BenchConfig(seeds=(0,), recipes=("A",), archs=("test_cnn",), eps_sweep=(0.2, 0.3), probe_hidden=8,
                        split="val")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("bench")
    params = tiny_params(work / "unused")
    return params, work, bench.run_strength(params, work, CFG)


def test_jobs_run_the_stages_and_stay_within_budget(tiny_run):
    _, work, results = tiny_run
    assert set(results) == {"clean", "untargeted", "label_specific", "eps0.2"}
    for name in ("untargeted", "label_specific", "eps0.2"):
        r = results[name]
        assert r["within_budget"] and r["max_linf_stored"] <= r["generator_config"]["eps"] + 1e-12
        assert (work / f"{name}-{r['fingerprint']}" / "poisoned" / "manifest.json").is_file()  # stored as shards
    assert results["eps0.2"]["generator_config"]["eps"] == 0.2
    assert set(results["untargeted"]["models"]) == {"test_cnn", "random_forest", "svm_rbf"}
    assert set(results["eps0.2"]["models"]) == {"test_cnn"}  # the sweep scores the surrogate only
    ls = results["label_specific"]["models"]["test_cnn"]["A"][0]
    assert 0.0 <= ls["target_rate"] <= 1.0
    assert "target_rate" not in results["untargeted"]["models"]["test_cnn"]["A"][0]


def test_diagnostics_are_reported(tiny_run):
    _, _, results = tiny_run
    diag = results["untargeted"]["diagnostics"]
    assert set(diag["noise_only"]) == {"A/0"}
    assert set(diag["probes"]) == {"perturbation", "clean_images", "iid_noise"}
    for probe in diag["probes"].values():
        assert set(probe) == {"linear", "mlp8"}
        assert all(0.0 <= v <= 1.0 for p in probe.values() for v in p.values())


def test_cached_jobs_are_reused_and_fresh_reruns(tiny_run, monkeypatch):
    params, work, results = tiny_run
    calls = []
    real = bench.stages.train_generator
    monkeypatch.setattr(bench.stages, "train_generator", lambda p: calls.append(p) or real(p))
    again = bench.run_strength(params, work, CFG)
    assert again == json.loads(json.dumps(results)) and not calls
    # fresh recomputes only the jobs selected now, and keeps the others' results
    rerun = bench.run_strength(params, work, CFG, only=("eps0.2",), fresh=True)
    assert len(calls) == 1 and calls[0].train_generator.eps == 0.2
    assert rerun["untargeted"] == again["untargeted"] and set(rerun) == set(again)
    # another configuration is another job, in its own folder: not served from the cache
    other = bench.BenchConfig(**{**CFG.__dict__, "seeds": (1,)})
    partial = bench.run_strength(params, work, other, only=("eps0.2",))
    assert len(calls) == 2 and partial["_missing"] == ["clean", "untargeted", "label_specific"]
    assert partial["eps0.2"]["fingerprint"] != results["eps0.2"]["fingerprint"]
    assert "**Incomplete**: no result yet for job(s) clean, untargeted, label_specific" in bench.render_markdown(partial, "x")
    # changed code, or another way of materializing the poison, is not served the stored results either
    monkeypatch.setattr(bench, "code_fingerprint", lambda: "other code")
    assert bench.run_strength(params, work, CFG, only=())["_missing"] == ["clean", "untargeted", "label_specific",
                                                                         "eps0.2"]
    monkeypatch.undo()
    import dataclasses

    threads = dataclasses.replace(params, poison=dataclasses.replace(params.poison, threads=2))
    assert len(bench.run_strength(threads, work, CFG, only=())["_missing"]) == 4
    assert "_missing" not in bench.run_strength(params, work, CFG, only=())


def test_a_clean_split_made_from_other_settings_is_refused(tiny_run):
    params, work, _ = tiny_run
    import dataclasses

    other = dataclasses.replace(params, seed=5)
    with pytest.raises(ConfigError, match="workdir: .*clean split made from other data settings or seed"):
        bench.run_strength(other, work, CFG, only=("clean",))


def test_the_surrogate_must_be_benchmarked(tiny_run):
    params, work, _ = tiny_run
    cfg = bench.BenchConfig(**{**CFG.__dict__, "archs": ("mlp",)})
    with pytest.raises(ConfigError, match="archs: expected the surrogate 'test_cnn'"):
        bench.run_strength(params, work, cfg)


def test_unknown_job_names_the_known_ones(tiny_run):
    params, work, _ = tiny_run
    with pytest.raises(ConfigError, match="only: unknown job 'eps9'.*untargeted"):
        bench.run_strength(params, work, CFG, only=("eps9",))


def test_markdown_block_is_replaced_not_duplicated(tiny_run, tmp_path):
    _, _, results = tiny_run
    body = bench.render_markdown(results, "poison bench --split val")
    assert "| `test_cnn` | A |" in body and "| `random_forest` | pixels |" in body
    assert "| 0.2 |" in body and "| 0.3 |" in body and "Noise-only accuracy" in body
    md = tmp_path / "B.md"
    md.write_text("# Benchmarks\n\nhand-written text\n")
    bench.update_markdown(md, body)
    bench.update_markdown(md, body.replace("poison bench", "poison bench --again"))
    text = md.read_text()
    assert text.count(bench.MARK_BEGIN) == 1 and "--again" in text and "hand-written text" in text


def test_bench_config_rejects_bad_values():
    with pytest.raises(ConfigError, match="recipes: unknown recipe 'Z'"):
        bench.BenchConfig(recipes=("Z",))
    with pytest.raises(ConfigError, match="archs: unknown classifier 'vgg'"):
        bench.BenchConfig(archs=("vgg",))
    with pytest.raises(ConfigError, match="split"):
        bench.BenchConfig(split="train")


def test_generator_config_applies_overrides_and_validates(tmp_path):
    params = tiny_params(tmp_path)
    g = bench.generator_config(params, {"objective": "align", "trials": 2}, "label_specific", "--label-specific")
    assert g.target == "label_specific" and g.objective == "align" and g.trials == 2
    with pytest.raises(ConfigError, match="train_generator.trails: unknown key"):
        bench.generator_config(params, {"trails": 2}, "untargeted", "--untargeted")
    with pytest.raises(ConfigError, match="--untargeted: 'target' is set by the benchmark"):
        bench.generator_config(params, {"target": "label_specific"}, "untargeted", "--untargeted")
    with pytest.raises(ConfigError, match="--label-specific: expected a JSON object"):
        bench.generator_config(params, [1], "label_specific", "--label-specific")


def test_cli_bench_writes_json_and_markdown(tmp_path, capsys):
    import yaml

    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_params_dict(tmp_path / "unused")))
    out, md = tmp_path / "s.json", tmp_path / "B.md"
    common = ["--params", str(tmp_path / "params.yaml"), "--workdir", str(tmp_path / "w"), "--out", str(out),
              "--markdown", str(md)]
    rc = main(["bench", *common, "--seeds", "0", "--recipes", "A", "--archs", "test_cnn", "--eps-sweep", "0.3",
               "--no-sklearn", "--no-label-specific", "--split", "val", "--threads", "1"])
    assert rc == 0
    assert set(json.loads(out.read_text())) == {"clean", "untargeted"}
    assert "poison bench --params" in md.read_text()
    def snapshot():
        return {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()}

    before = snapshot()
    assert main(["bench", *common, "--untargeted", "{not json"]) == 1
    assert "--untargeted: expected a JSON object" in capsys.readouterr().err
    assert snapshot() == before  # a rejected run writes nothing: not the JSON, the Markdown or the workdir


def test_recipes_script_scores_other_architectures_and_sklearn_models(clean_dataset, poisoned_dataset):
    import subprocess
    import sys

    from conftest import REPO

    cmd = [sys.executable, str(REPO / "benchmarks" / "recipes.py"), "--clean", str(clean_dataset),
           "--poisoned", str(poisoned_dataset), "--epochs", "1", "--seeds", "0", "1", "--threads", "1",
           "--arch", "test_cnn", "--sklearn", "random_forest", "svm_rbf", "--poisoned-only"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == ["test_cnn, lr 0.001, 1 epochs, poisoned-trained",
                                                      "random_forest, poisoned-trained", "svm_rbf, poisoned-trained"]
    assert [len(line.split(":")[1].split()) for line in lines] == [2, 2, 1]  # the SVM fits once
    bad = subprocess.run([*cmd[:2], "--arch", "nope"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert bad.returncode != 0 and "--arch" in bad.stderr and "nope" in bad.stderr


def test_adversarial_poison_baseline_reaches_its_target_within_budget(clean_dataset):
    import subprocess
    import sys

    from conftest import REPO

    cmd = [sys.executable, str(REPO / "benchmarks" / "adversarial_poison.py"), "--clean", str(clean_dataset),
           "--ref-arch", "test_cnn", "--arch", "test_cnn", "--ref-epochs", "6", "--steps", "10", "--eps", "0.3",
           "--recipes", "A", "--seeds", "0", "1", "--threads", "1", "--shift", "-1"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.split("RESULT", 1)[1])
    assert result["max_levels"] <= int(0.3 * 255)  # stored within the budget
    # PGD moves the reference model to the target class (a weak tiny model: far from all of it)
    assert result["reference_hit_rate"] > result["reference_hit_rate_clean"] + 0.2
    assert len(result["A"]["accuracy"]) == 2 and all(0.0 <= r <= 1.0 for r in result["A"]["target_rate"])
    bad = subprocess.run([*cmd[:4], "--shift", "10"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert bad.returncode != 0 and "--shift: must not be a multiple of 10" in bad.stderr
    bad = subprocess.run([*cmd[:4], "--ref-adv-eps", "2"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert bad.returncode != 0 and "--ref-adv-eps / --ref-adv-steps: expected a radius in [0, 1]" in bad.stderr


def test_adversarial_poison_baseline_with_an_adversarially_trained_reference(clean_dataset):
    import subprocess
    import sys

    from conftest import REPO

    cmd = [sys.executable, str(REPO / "benchmarks" / "adversarial_poison.py"), "--clean", str(clean_dataset),
           "--ref-arch", "test_cnn", "--arch", "test_cnn", "--ref-epochs", "2", "--steps", "3", "--recipes", "A",
           "--seeds", "0", "--threads", "1", "--shift", "-1", "--ref-adv-eps", "0.1", "--ref-adv-steps", "2"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.split("RESULT", 1)[1])
    assert (result["ref_adv_eps"], result["ref_adv_steps"]) == (0.1, 2) and result["max_levels"] <= int(0.3 * 255)


def test_targets_merge_keeps_the_methods_a_rerun_did_not_measure():
    import importlib.util

    from conftest import REPO

    spec = importlib.util.spec_from_file_location("bench_targets", REPO / "benchmarks" / "targets.py")
    targets = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(targets)
    run = {"seed": 10, "k": 5, "split": "val", "samples": 200, "c_init": {"ad": 10.0, "cwk": 10.0},
           "ad_distribution": {"alpha": 10.0, "beta": 0.3, "similarity": "data"}}
    ad = {"topk_attacks": {"command": "targets.py --topk-methods ad", "runs": [{**run, "ad": {"mean_l2": 3.8}}]}}
    cwk = {"topk_attacks": {"command": "targets.py --topk-methods cwk", "runs": [{**run, "cwk": {"mean_l2": 3.5}}]}}
    merged = targets._merge("topk_attacks", ad["topk_attacks"], cwk["topk_attacks"])
    assert len(merged["runs"]) == 1 and merged["runs"][0]["ad"] == {"mean_l2": 3.8}
    assert merged["runs"][0]["cwk"] == {"mean_l2": 3.5} and len(merged["commands"]) == 2
    again = targets._merge("topk_attacks", merged, {"runs": [{**run, "ad": {"mean_l2": 3.7}}]})
    assert len(again["runs"]) == 1 and again["runs"][0]["ad"] == {"mean_l2": 3.7}  # a rerun replaces its method
    other = targets._merge("topk_attacks", merged, {"runs": [{**run, "k": 1, "ad": {"mean_l2": 2.3}}]})
    assert len(other["runs"]) == 2  # a different measurement is added
    # another search budget is another measurement: never merged into the 100-step row, shown apart
    longer = targets._merge("topk_attacks", merged, {"runs": [{**run, "search": {"iterations": 1000, "binary_steps": 4},
                                                                "ad": {"success_rate": 1.0, "mean_l2": 3.1}}]})
    assert len(longer["runs"]) == 2 and longer["runs"][0]["ad"] == {"mean_l2": 3.8}
    table = targets.markdown({"topk_attacks": longer})
    assert "| 5 (1000 steps x 4 c) | 200 |" in table and "| 5 | 200 |" in table


def test_targets_poison_runs_of_other_trial_counts_are_other_measurements():
    import importlib.util

    from conftest import REPO

    spec = importlib.util.spec_from_file_location("bench_targets", REPO / "benchmarks" / "targets.py")
    targets = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(targets)
    down = [{"seed": 0, "exact_match": 0.5, "hamming_loss": 0.1, "macro_f1": 0.8, "label0_f1": 0.8, "target_rate": 0.0}]
    six = {"variant": "untargeted", "generator": "unet16_cond", "generator_seed": 0, "trials": 6, "runs": down}
    twelve = {**six, "trials": 12, "runs": [{**down[0], "exact_match": 0.1}]}
    merged = targets._merge("multilabel_poison", {"runs": [six]}, {"runs": [twelve]})
    assert len(merged["runs"]) == 2  # 12 trials does not replace the 6-trial run
    again = targets._merge("multilabel_poison", merged, {"runs": [{**twelve, "runs": down}]})
    assert len(again["runs"]) == 2 and again["runs"][-1]["runs"] == down  # a rerun of the same replaces it
    table = targets.markdown({"multilabel_poison": again})
    assert "| untargeted, `unet16_cond` | 0 | 50.0" in table
    assert "| untargeted, `unet16_cond`, 12 trials | 0 | 50.0" in table
    # scored on validation, or with other downstream seeds: other measurements, labelled apart
    val = {**six, "split": "val", "runs": [{**down[0], "exact_match": 0.3}]}
    seeds = {**six, "runs": [{**down[0], "seed": 1}]}
    more = targets._merge("multilabel_poison", again, {"runs": [val, seeds]})
    assert len(more["runs"]) == 4
    assert "| untargeted, `unet16_cond` (scored on val) | 0 | 30.0" in targets.markdown({"multilabel_poison": more})


@pytest.mark.parametrize("args, message", [
    (["{}", "--victims", "0"], "--victims: expected an integer >= 1, got 0"),
    (['{"restarts": 2}'], "restarts: this script scores one generator run, got 2"),
    (["{}", "--select-recipes", "B7"], "--select-recipes: invalid choice"),
])
def test_trial_scores_rejects_bad_arguments_before_training(tmp_path, args, message):
    import subprocess
    import sys

    from conftest import REPO

    out = tmp_path / "scores.json"
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "trial_scores.py"), *args, "--out", str(out)],
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    assert run.returncode != 0 and message in run.stderr
    assert not out.exists()  # nothing written


def _benchmark_module(name, monkeypatch):
    import importlib.util

    from conftest import REPO

    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))  # the scripts import their neighbours
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_trial_scores_key_names_every_option_that_changes_the_figures(monkeypatch):
    import argparse

    scores = _benchmark_module("trial_scores", monkeypatch)
    defaults = dict(seed=0, split="val", **{k: list(v) if isinstance(v, list) else v
                                            for k, v in scores.KEY_DEFAULTS.items()})
    plain = json.loads(scores.run_key({"trials": 4}, argparse.Namespace(**defaults)))
    assert plain == {"config": {"trials": 4}, "seed": 0, "split": "val"}  # the stored keys' form
    for option, value in [("seeds", [100]), ("threads", 2), ("victims", 3), ("select_recipes", ["A", "B20"]),
                          ("downstream", "picks")]:
        key = json.loads(scores.run_key({"trials": 4}, argparse.Namespace(**(defaults | {option: value}))))
        assert key == plain | {option: value}, option


def test_benchmark_split_follows_params_yaml(tmp_path, monkeypatch):
    import yaml

    from conftest import REPO

    config = _benchmark_module("deepconfuse_config", monkeypatch)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"] |= {"per_class": 40, "val_size": 50, "test_size": 100}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    train, val, test = config.default_split(str(path))
    assert (len(train.labels), len(val.labels), len(test.labels)) == (250, 50, 100)
    assert torch.bincount(test.labels, minlength=10).tolist() == [10] * 10  # stratified
    pools = [set(map(tuple, s.images.flatten(1)[:, ::7].tolist())) for s in (train, val, test)]
    assert not (pools[0] & pools[2]) and not (pools[1] & pools[2])  # no image in two splits
