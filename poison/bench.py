"""The strength benchmark: how much a DeepConfuse configuration hurts models trained on its poison.

Behind ``poison bench`` and ``benchmarks/strength.py``. Protocol (fixed, whatever the
configuration): the pipeline's own stages make the clean split (``prepare``), train
the generator on the training split and select it on the validation split
(``train_generator``), and materialize the poison as uint8 WebDataset shards
(``poison``); the shards are read back and every downstream model is trained from
scratch on them, with seeds never used in generator training, and tested on the clean
``split`` (``test`` to report, ``val`` while tuning). Nothing is selected on the test split.

Jobs (each cached as ``<workdir>/jobs/<name>.json`` keyed by its configuration, so a
run can be resumed or split across processes with ``only``):

- ``clean``: every classifier trained on the clean training split (the baselines);
- ``untargeted``: the untargeted poison at the configured eps: every classifier under
  every recipe x seed, scikit-learn's random forest and RBF SVM (as the paper does),
  noise-only accuracy (paper Table 2) and separability probes of the perturbations;
- ``label_specific``: the same for the label-specific (y -> t(y)) poison, scored by the
  target rate;
- ``eps<e>``: the untargeted poison at each other eps of the sweep, on the surrogate
  architecture only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from poison import stages
from poison.attacks.deepconfuse_config import DeepConfuseConfig
from poison.attacks.perturbation import poison_images
from poison.config import Params, PathsConfig, from_dict, to_dict
from poison.diagnostics import noise_only_accuracy, perturbations, probe_accuracy, uniform_noise
from poison.errors import ConfigError
from poison.evaluate import classification_metrics, fit_classifier
from poison.models import check_classifiers
from poison.shards import load_split, read_manifest
from poison.train import TrainConfig, predict
from poison.utils import (atomic_write_bytes, atomic_write_json, canonical_json, code_fingerprint, git_revision,
                          make_generator, resolve_device)

__all__ = ["RECIPES", "SKLEARN_MODELS", "BenchConfig", "run_strength", "render_markdown", "update_markdown",
           "generator_config"]

log = logging.getLogger(__name__)

#: Downstream recipes of issue 3 (Adam, batch 64): the authors' test recipe and a long one.
RECIPES: dict[str, TrainConfig] = {
    "A": TrainConfig("adam", 0.01, epochs=2, batch_size=64),
    "B20": TrainConfig("adam", 1e-3, epochs=20, batch_size=64),
}

#: Non-neural classifiers of the paper's transfer table, trained on raw pixels in [0, 1].
SKLEARN_MODELS = ("random_forest", "svm_rbf")

MARK_BEGIN = "<!-- BEGIN poison bench (generated: do not edit by hand) -->"
MARK_END = "<!-- END poison bench -->"


@dataclass(frozen=True)
class BenchConfig:
    """What the strength benchmark measures (the protocol itself is fixed)."""

    seeds: tuple[int, ...] = (0, 1, 2)
    recipes: tuple[str, ...] = ("A", "B20")
    archs: tuple[str, ...] = ("dc_cnn", "dc_cnn_small", "dc_cnn_large", "mlp", "resnet8")
    sklearn: tuple[str, ...] = SKLEARN_MODELS
    eps_sweep: tuple[float, ...] = (0.1, 0.15, 0.2, 0.25, 0.3)
    label_specific: bool = True
    split: str = "test"
    probe_hidden: int = 256

    def __post_init__(self) -> None:
        if not self.seeds:
            raise ConfigError("seeds: expected at least one downstream seed, got none; pass e.g. --seeds 0 1 2")
        for r in self.recipes:
            if r not in RECIPES:
                raise ConfigError(f"recipes: unknown recipe {r!r}; known: {', '.join(RECIPES)}")
        check_classifiers(self.archs, "archs")
        for m in self.sklearn:
            if m not in SKLEARN_MODELS:
                raise ConfigError(f"sklearn: unknown model {m!r}; known: {', '.join(SKLEARN_MODELS)}")
        if any(not 0 < e <= 1 for e in self.eps_sweep):
            raise ConfigError(f"eps_sweep: expected values in (0, 1] (L-inf on [0, 1] images), got {list(self.eps_sweep)}")
        if self.probe_hidden < 1:
            raise ConfigError(f"probe_hidden: expected an integer >= 1, got {self.probe_hidden}")
        if self.split not in ("val", "test"):
            raise ConfigError(f"split: expected 'val' (tuning) or 'test' (reporting), got {self.split!r}")


def _sklearn_model(name: str, seed: int):
    try:
        from sklearn.ensemble import RandomForestClassifier
        from sklearn.svm import SVC
    except ImportError as exc:  # an optional dependency of the benchmark only
        raise ConfigError(
            "sklearn: the random forest and SVM need scikit-learn; pip install -e '.[dev]' "
            "or pass --no-sklearn"
        ) from exc
    if name == "random_forest":
        return RandomForestClassifier(n_estimators=100, random_state=seed, n_jobs=1)
    return SVC(kernel="rbf", C=1.0, gamma="scale")


def _flat(images: torch.Tensor) -> Any:
    return (images.float() / 255.0).flatten(1).numpy()


class _Data:
    """The clean splits, loaded once from the shards."""

    def __init__(self, clean_dir: Path, split: str) -> None:
        self.x_tr, self.y_tr, _ = load_split(clean_dir, "train")
        self.x_te, self.y_te, _ = load_split(clean_dir, split)
        self.num_classes = len(read_manifest(clean_dir)["classes"])


def _run_models(cfg: BenchConfig, data: _Data, x: torch.Tensor, y: torch.Tensor, archs: tuple[str, ...],
                device: torch.device, target_map: torch.Tensor | None,
                on_model: Callable[[str, str, int, torch.nn.Module], None] | None = None) -> dict[str, Any]:
    """Return {arch: {recipe: [per-seed metrics]}} for neural archs and scikit-learn models."""
    out: dict[str, Any] = {}
    for arch in archs:
        out[arch] = {}
        for rname in cfg.recipes:
            runs = []
            for seed in cfg.seeds:
                start = time.perf_counter()
                model = fit_classifier(x, y, arch=arch, recipe=RECIPES[rname], seed=seed,
                                       num_classes=data.num_classes, device=device)
                pred = predict(model, data.x_te).argmax(1)
                m = classification_metrics(pred, data.y_te, data.num_classes, target_map)
                m.pop("confusion_matrix")
                runs.append({"seed": seed, **m, "seconds": round(time.perf_counter() - start, 1)})
                log.info("bench: %s %s seed %d: accuracy %.4f target rate %s", arch, rname, seed, m["accuracy"],
                         m.get("target_rate"))
                if on_model is not None:
                    on_model(arch, rname, seed, model)
            out[arch][rname] = runs
    for name in cfg.sklearn:
        # The SVM is deterministic: one fit stands for every seed.
        seeds = cfg.seeds if name == "random_forest" else cfg.seeds[:1]
        runs = []
        for seed in seeds:
            start = time.perf_counter()
            clf = _sklearn_model(name, seed).fit(_flat(x), y.numpy())
            pred = torch.as_tensor(clf.predict(_flat(data.x_te)), dtype=torch.long)
            m = classification_metrics(pred, data.y_te, data.num_classes, target_map)
            m.pop("confusion_matrix")
            runs.append({"seed": seed, **m, "seconds": round(time.perf_counter() - start, 1)})
            log.info("bench: %s seed %d: accuracy %.4f", name, seed, m["accuracy"])
        out[name] = {"pixels": runs}
    return out


def _diagnostics(cfg: BenchConfig, data: _Data, x_p: torch.Tensor, noise_te: torch.Tensor, eps: float,
                 models: dict[tuple[str, int], torch.nn.Module]) -> dict[str, Any]:
    """Noise-only accuracy of the surrogate-architecture models; separability probes."""
    noise_tr = perturbations(data.x_tr, x_p)
    noise_only = {f"{r}/{s}": {"train_noise": noise_only_accuracy(m, noise_tr, data.y_tr),
                               "test_noise": noise_only_accuracy(m, noise_te, data.y_te)}
                  for (r, s), m in models.items()}
    rng = make_generator(0, "bench-iid-noise")
    iid_tr = uniform_noise(tuple(noise_tr.shape), eps, rng)
    iid_te = uniform_noise(tuple(noise_te.shape), eps, rng)
    k = data.num_classes
    probes: dict[str, Any] = {}
    for name, (a, b) in {"perturbation": (noise_tr, noise_te),
                         "clean_images": (data.x_tr.float() / 255.0, data.x_te.float() / 255.0),
                         "iid_noise": (iid_tr, iid_te)}.items():
        probes[name] = {
            "linear": probe_accuracy(a, data.y_tr, b, data.y_te, num_classes=k, hidden=0),
            f"mlp{cfg.probe_hidden}": probe_accuracy(a, data.y_tr, b, data.y_te, num_classes=k,
                                                     hidden=cfg.probe_hidden),
        }
    return {"noise_only": noise_only, "probes": probes}


def _fingerprint(obj: Any) -> str:
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()[:16]


#: Bump when the benchmark's fixed settings change (probe training, scikit-learn
#: hyperparameters, what a job records): cached results of older versions are recomputed.
BENCH_VERSION = 1


def _check_clean(clean_dir: Path, params: Params) -> None:
    """Raise unless the clean shards in ``clean_dir`` were made from ``params`` (data, seed)."""
    m = read_manifest(clean_dir)
    if m.get("config") != to_dict(params.data) or m.get("seed") != params.seed:
        raise ConfigError(
            f"workdir: {clean_dir} holds a clean split made from other data settings or seed than params.yaml "
            f"(data {m.get('config')}, seed {m.get('seed')}); pass another --workdir or delete that folder"
        )


def run_strength(
    params: Params,
    workdir: str | Path,
    cfg: BenchConfig = BenchConfig(),
    untargeted: DeepConfuseConfig | None = None,
    label_specific: DeepConfuseConfig | None = None,
    only: tuple[str, ...] | None = None,
    fresh: bool = False,
) -> dict[str, Any]:
    """Run (or resume) the benchmark jobs; return {job name: result} for every finished job.

    ``untargeted`` / ``label_specific`` default to ``params.train_generator`` with the
    target set accordingly. ``only`` restricts the jobs run now (finished ones are still
    returned); ``fresh`` recomputes the jobs run now instead of reusing their results.
    Each job works in its own folder named after its configuration's fingerprint, so
    processes running different jobs or configurations in one workdir never share files.
    """
    workdir = Path(workdir)
    device = resolve_device(params.device)
    # the benchmark runs its jobs with the threads it was given (`poison bench --threads`; recorded in
    # every job's key below), not the pipeline's train_generator.threads
    base = dataclasses.replace(params.train_generator, threads=None)
    untargeted = untargeted or dataclasses.replace(base, target="untargeted", target_map=None)
    label_specific = label_specific or dataclasses.replace(base, target="label_specific", untargeted_loss="ce")
    if untargeted.target != "untargeted":
        raise ConfigError(f"untargeted: expected a config with target: untargeted, got target: {untargeted.target}")
    if label_specific.target != "label_specific":
        raise ConfigError(f"label_specific: expected a config with target: label_specific, "
                          f"got target: {label_specific.target}")
    for g in (untargeted, label_specific) if cfg.label_specific else (untargeted,):
        if g.surrogate not in cfg.archs:
            raise ConfigError(f"archs: expected the surrogate {g.surrogate!r} among the classifiers (noise-only "
                              f"accuracy and the eps sweep use it), got {list(cfg.archs)}; add it to --archs")
    if cfg.sklearn:
        _sklearn_model(cfg.sklearn[0], 0)  # fail before hours of training when scikit-learn is missing
    revision = git_revision(Path(__file__).parent)
    clean_dir = workdir / "clean"
    clean_params = dataclasses.replace(params, paths=PathsConfig(
        clean=str(clean_dir), generator=str(workdir / "clean-unused" / "g.pt"),
        poisoned=str(workdir / "clean-unused" / "p"), reports=str(workdir / "clean-unused" / "reports")))
    recipes = {r: to_dict(RECIPES[r]) for r in cfg.recipes}
    # everything a stored result depends on: the code (a fix to the quantizer or a model must not be
    # served stale results), the device, and how the poison is materialized (threads are part of the bytes)
    common = {"version": BENCH_VERSION, "data": to_dict(params.data), "seed": params.seed, "split": cfg.split,
              "seeds": list(cfg.seeds), "recipes": recipes, "code": code_fingerprint(), "device": str(device),
              "poison": to_dict(params.poison), "threads": torch.get_num_threads()}

    jobs: dict[str, tuple[dict[str, Any], Callable[[], dict[str, Any]]]] = {}
    state: dict[str, Any] = {}

    def data() -> _Data:
        if "data" not in state:
            if not (clean_dir / "manifest.json").is_file():
                stages.prepare(clean_params)
            _check_clean(clean_dir, params)
            state["data"] = _Data(clean_dir, cfg.split)
        return state["data"]

    def poison_job(gcfg: DeepConfuseConfig, archs: tuple[str, ...], sklearn: bool,
                   diagnostics: bool) -> Callable[[Path], dict[str, Any]]:
        def run(job_dir: Path) -> dict[str, Any]:
            d = data()
            p = dataclasses.replace(params, train_generator=gcfg, paths=PathsConfig(
                clean=str(clean_dir), generator=str(job_dir / "generator.pt"),
                poisoned=str(job_dir / "poisoned"), reports=str(job_dir / "reports")))
            trained = stages.train_generator(p)
            stages.poison(p)
            x_p, y_p, _ = load_split(job_dir / "poisoned", "train")
            tm = read_manifest(job_dir / "poisoned")["config"].get("target_map")
            target_map = None if tm is None else torch.tensor(tm, dtype=torch.long)
            budget = int((x_p.to(torch.int16) - d.x_tr.to(torch.int16)).abs().max())
            # The test split's perturbations, from this job's own generator, for noise-only accuracy.
            gen, _ = stages.load_generator(job_dir / "generator.pt", device)
            noise_te = perturbations(d.x_te, poison_images(gen, d.x_te, gcfg.eps, device, labels=d.y_te))
            surrogate_models: dict[tuple[str, int], torch.nn.Module] = {}

            def keep(arch: str, recipe: str, seed: int, model: torch.nn.Module) -> None:
                if diagnostics and arch == gcfg.surrogate:
                    surrogate_models[(recipe, seed)] = model

            sub = dataclasses.replace(cfg, sklearn=cfg.sklearn if sklearn else ())
            result = {
                "generator_config": to_dict(gcfg),
                "generator_train_seconds": trained["train_seconds"],
                "best_trial": trained["best_trial"],
                "device": str(device),
                "max_linf_stored": budget / 255.0,
                "within_budget": budget / 255.0 <= gcfg.eps + 1e-12,
                "models": _run_models(sub, d, x_p, y_p, archs, device, target_map, keep),
            }
            if diagnostics:
                result["diagnostics"] = _diagnostics(cfg, d, x_p, noise_te, gcfg.eps, surrogate_models)
            return result
        return run

    def clean_job(job_dir: Path) -> dict[str, Any]:
        del job_dir
        d = data()
        return {"device": str(device), "models": _run_models(cfg, d, d.x_tr, d.y_tr, cfg.archs, device, None)}

    full = {"archs": list(cfg.archs), "sklearn": list(cfg.sklearn)}
    jobs["clean"] = ({**common, **full, "job": "clean"}, clean_job)
    jobs["untargeted"] = ({**common, **full, "job": "untargeted", "generator": to_dict(untargeted),
                           "probe_hidden": cfg.probe_hidden},
                          poison_job(untargeted, cfg.archs, True, True))
    if cfg.label_specific:
        jobs["label_specific"] = ({**common, **full, "job": "label_specific", "generator": to_dict(label_specific),
                                   "probe_hidden": cfg.probe_hidden},
                                  poison_job(label_specific, cfg.archs, True, True))
    for eps in cfg.eps_sweep:
        if abs(eps - untargeted.eps) < 1e-12:
            continue  # the untargeted job is this point of the sweep
        g = dataclasses.replace(untargeted, eps=eps)
        name = f"eps{eps:g}"
        jobs[name] = ({**common, "archs": [g.surrogate], "job": name, "generator": to_dict(g)},
                      poison_job(g, (g.surrogate,), False, False))
    if only is not None:
        unknown = sorted(set(only) - set(jobs))
        if unknown:
            raise ConfigError(f"only: unknown job {unknown[0]!r}; jobs of this configuration: {', '.join(jobs)}")

    results: dict[str, Any] = {}
    for name, (key, run) in jobs.items():
        fp = _fingerprint(key)
        path = workdir / "jobs" / f"{name}-{fp}.json"
        selected = only is None or name in only
        if path.is_file() and not (fresh and selected):
            try:
                results[name] = json.loads(path.read_text())
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{path}: not a readable job result ({exc}); delete it or pass --fresh") from None
            continue
        if not selected:
            log.warning("bench: job %s has no result for this configuration yet (run it with --only %s)", name, name)
            continue
        log.info("bench: running job %s (%s)", name, fp)
        start = time.perf_counter()
        res = run(workdir / f"{name}-{fp}")
        res.update(job=name, fingerprint=fp, key=key, git_revision=revision,
                   job_seconds=round(time.perf_counter() - start, 1))
        atomic_write_json(path, res)
        results[name] = res
    missing = [n for n in jobs if n not in results]
    if missing:
        results["_missing"] = missing
    return results


# ------------------------------------------------------------------ reporting
def _pct(values: list[float]) -> str:
    if not values:
        return "-"
    mean = 100 * sum(values) / len(values)
    if len(values) == 1:
        return f"{mean:.2f}"
    return f"{mean:.2f} ({100 * min(values):.1f}-{100 * max(values):.1f})"


def _metric(runs: list[dict[str, Any]], key: str) -> list[float]:
    return [r[key] for r in runs if r.get(key) is not None]


def render_markdown(results: dict[str, Any], command: str) -> str:
    """Return the Markdown tables of a benchmark run (figures in %, mean (min-max) over seeds)."""
    lines = [f"Command: `{command}`", ""]
    missing = results.get("_missing", [])
    results = {k: v for k, v in results.items() if not k.startswith("_")}
    any_job = next(iter(results.values()), None)
    if any_job is None:
        return "\n".join(lines + ["(no results)"])
    key = any_job["key"]
    recipes, split = list(key["recipes"]), key["split"]
    lines += [f"Downstream seeds {key['seeds']}; scored on the clean **{split}** split; figures are % "
              "(mean over seeds, min-max in brackets); code revision "
              + ", ".join(sorted({str(r.get("git_revision")) for r in results.values()})) + "."]
    lines.append("")
    if split == "val":
        lines += ["Tuning figures: the validation split also selects the generator, so they are optimistic.", ""]
    if missing:
        lines += [f"**Incomplete**: no result yet for job(s) {', '.join(missing)} (shown as -).", ""]
    clean, unt, ls = results.get("clean"), results.get("untargeted"), results.get("label_specific")
    names = list((unt or clean or ls or {"models": {}})["models"])
    header = "| classifier | recipe | clean data: accuracy | untargeted poison: accuracy | label-specific poison: accuracy / target rate |"
    lines += [f"**Accuracy on the clean {split} split of classifiers trained on each dataset**", "", header,
              "|---|---|---|---|---|"]
    for arch in names:
        for rname in (recipes if arch not in SKLEARN_MODELS else ["pixels"]):
            def cell(res: dict[str, Any] | None, key: str = "accuracy") -> str:
                if res is None or arch not in res["models"]:
                    return "-"
                return _pct(_metric(res["models"][arch].get(rname, []), key))
            ls_cell = "-" if ls is None else f"{cell(ls)} / {cell(ls, 'target_rate')}"
            lines.append(f"| `{arch}` | {rname} | {cell(clean)} | {cell(unt)} | {ls_cell} |")
    lines.append("")
    sweep = sorted(((r["generator_config"]["eps"], r) for n, r in results.items()
                    if n == "untargeted" or n.startswith("eps")), key=lambda t: t[0])
    if sweep:
        arch = sweep[0][1]["generator_config"]["surrogate"]
        lines += [f"**Eps sweep (untargeted, `{arch}`)**", "",
                  "| eps | " + " | ".join(f"recipe {r}" for r in recipes) + " | generator training (s) | device |",
                  "|---|" + "---|" * (len(recipes) + 2)]
        for eps, r in sweep:
            cells = [_pct(_metric(r["models"][arch].get(rn, []), "accuracy")) for rn in recipes]
            lines.append(f"| {eps:g} | " + " | ".join(cells) + f" | {r['generator_train_seconds']} | {r['device']} |")
        lines.append("")
    for name, res in (("untargeted", unt), ("label-specific", ls)):
        if res is None or "diagnostics" not in res:
            continue
        diag = res["diagnostics"]
        tr = [v["train_noise"] for v in diag["noise_only"].values()]
        te = [v["test_noise"] for v in diag["noise_only"].values()]
        lines += [f"**Diagnostics, {name} poison** (generator {res['generator_train_seconds']} s on "
                  f"{res['device']}, best trial {res['best_trial']}, largest stored change "
                  f"{res['max_linf_stored']:.3f})", "",
                  f"- Noise-only accuracy of the poison-trained `{res['generator_config']['surrogate']}` "
                  f"(all recipes x seeds): train noise {_pct(tr)}, test noise {_pct(te)}.",
                  "", "| probe input | linear probe: train / test | 1-hidden-layer probe: train / test |",
                  "|---|---|---|"]
        for inp, pr in diag["probes"].items():
            mlp_key = next(k for k in pr if k != "linear")
            lines.append(f"| {inp} | {100 * pr['linear']['train_accuracy']:.1f} / {100 * pr['linear']['test_accuracy']:.1f}"
                         f" | {100 * pr[mlp_key]['train_accuracy']:.1f} / {100 * pr[mlp_key]['test_accuracy']:.1f} |")
        lines.append("")
    return "\n".join(lines)


def update_markdown(path: str | Path, body: str) -> None:
    """Replace the generated block of ``path`` (between the markers) with ``body``; append if absent."""
    path = Path(path)
    text = path.read_text() if path.is_file() else ""
    block = f"{MARK_BEGIN}\n{body.rstrip()}\n{MARK_END}"
    has_begin, has_end = MARK_BEGIN in text, MARK_END in text
    if has_begin != has_end:
        raise ConfigError(f"markdown: {path} has only one of the generated-block markers; restore "
                          f"{MARK_BEGIN!r} and {MARK_END!r} around the old block or remove both")
    if has_begin:
        head, rest = text.split(MARK_BEGIN, 1)
        text = head + block + rest.split(MARK_END, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    atomic_write_bytes(path, text.encode())


def generator_config(params: Params, overrides: Any, target: str, flag: str) -> DeepConfuseConfig:
    """Return params.train_generator with JSON ``overrides`` (from ``flag``) applied for ``target``, validated."""
    if not isinstance(overrides, dict):
        raise ConfigError(f"{flag}: expected a JSON object of train_generator keys, got {overrides!r}")
    for k in ("target",) + (("target_map",) if target == "untargeted" else ()):
        if k in overrides:
            raise ConfigError(f"{flag}: {k!r} is set by the benchmark for this poison; remove it from the JSON")
    merged = to_dict(params.train_generator) | {"target": target, "threads": None}  # the bench's --threads
    if target == "untargeted":
        merged["target_map"] = None
    else:
        merged["untargeted_loss"] = "ce"  # the label-specific loss is fixed by its target map
    return from_dict(DeepConfuseConfig, merged | overrides, "train_generator")
