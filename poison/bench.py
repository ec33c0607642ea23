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
from poison.attacks.deepconfuse import DeepConfuseConfig, poison_images
from poison.config import Params, PathsConfig, from_dict, to_dict
from poison.diagnostics import noise_only_accuracy, perturbations, probe_accuracy, uniform_noise
from poison.errors import ConfigError
from poison.evaluate import classification_metrics, fit_classifier
from poison.models import CLASSIFIERS
from poison.shards import load_split, read_manifest
from poison.train import TrainConfig, predict
from poison.utils import atomic_write_json, canonical_json, git_revision, make_generator, resolve_device

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
            raise ConfigError("seeds: expected at least one downstream seed")
        for r in self.recipes:
            if r not in RECIPES:
                raise ConfigError(f"recipes: unknown recipe {r!r}; known: {', '.join(RECIPES)}")
        for a in self.archs:
            if a not in CLASSIFIERS:
                raise ConfigError(f"archs: unknown classifier {a!r}; known: {', '.join(sorted(CLASSIFIERS))}")
        for m in self.sklearn:
            if m not in SKLEARN_MODELS:
                raise ConfigError(f"sklearn: unknown model {m!r}; known: {', '.join(SKLEARN_MODELS)}")
        if any(not 0 < e <= 1 for e in self.eps_sweep):
            raise ConfigError(f"eps_sweep: expected values in (0, 1], got {list(self.eps_sweep)}")
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


def _diagnostics(cfg: BenchConfig, data: _Data, x_p: torch.Tensor, checkpoint: Path, eps: float,
                 device: torch.device, models: dict[tuple[str, int], torch.nn.Module]) -> dict[str, Any]:
    """Noise-only accuracy of the surrogate-architecture models; separability probes."""
    gen, _ = stages.load_generator(checkpoint, device)
    noise_tr = perturbations(data.x_tr, x_p)
    noise_te = perturbations(data.x_te, poison_images(gen, data.x_te, eps, device))
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


def run_strength(
    params: Params,
    workdir: str | Path,
    cfg: BenchConfig = BenchConfig(),
    untargeted: DeepConfuseConfig | None = None,
    label_specific: DeepConfuseConfig | None = None,
    only: tuple[str, ...] | None = None,
    fresh: bool = False,
) -> dict[str, Any]:
    """Run (or resume) the benchmark jobs; return {job name: result}.

    ``untargeted`` / ``label_specific`` default to ``params.train_generator`` with the
    target set accordingly. ``only`` restricts the jobs run now (cached ones are still
    returned); ``fresh`` ignores cached job results.
    """
    workdir = Path(workdir)
    device = resolve_device(params.device)
    base = params.train_generator
    untargeted = untargeted or dataclasses.replace(base, target="untargeted", target_map=None)
    label_specific = label_specific or dataclasses.replace(base, target="label_specific", untargeted_loss="ce")
    if untargeted.target != "untargeted" or label_specific.target != "label_specific":
        raise ConfigError("bench: the untargeted config needs target: untargeted and the label-specific one "
                          "target: label_specific")
    clean_params = dataclasses.replace(params, paths=PathsConfig(
        clean=str(workdir / "clean"), generator=str(workdir / "clean-unused" / "g.pt"),
        poisoned=str(workdir / "clean-unused" / "p"), reports=str(workdir / "clean-unused" / "reports")))
    common = {"data": to_dict(params.data), "seed": params.seed, "bench": to_dict(cfg)}

    jobs: dict[str, tuple[dict[str, Any], Callable[[], dict[str, Any]]]] = {}
    state: dict[str, Any] = {}

    def data() -> _Data:
        if "data" not in state:
            if not (workdir / "clean" / "manifest.json").is_file():
                stages.prepare(clean_params)
            state["data"] = _Data(workdir / "clean", cfg.split)
        return state["data"]

    def poison_job(name: str, gcfg: DeepConfuseConfig, archs: tuple[str, ...], sklearn: bool,
                   diagnostics: bool) -> Callable[[], dict[str, Any]]:
        def run() -> dict[str, Any]:
            d = data()
            job_dir = workdir / name
            p = dataclasses.replace(params, train_generator=gcfg, paths=PathsConfig(
                clean=str(workdir / "clean"), generator=str(job_dir / "generator.pt"),
                poisoned=str(job_dir / "poisoned"), reports=str(job_dir / "reports")))
            trained = stages.train_generator(p)
            stages.poison(p)
            x_p, y_p, _ = load_split(job_dir / "poisoned", "train")
            target_map = None
            tm = read_manifest(job_dir / "poisoned")["config"].get("target_map")
            if tm is not None:
                target_map = torch.tensor(tm, dtype=torch.long)
            budget = int((x_p.to(torch.int16) - d.x_tr.to(torch.int16)).abs().max())
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
                result["diagnostics"] = _diagnostics(cfg, d, x_p, job_dir / "generator.pt", gcfg.eps, device,
                                                     surrogate_models)
            return result
        return run

    def clean_job() -> dict[str, Any]:
        d = data()
        return {"device": str(device), "models": _run_models(cfg, d, d.x_tr, d.y_tr, cfg.archs, device, None)}

    jobs["clean"] = ({**common, "job": "clean"}, clean_job)
    jobs["untargeted"] = ({**common, "job": "untargeted", "generator": to_dict(untargeted)},
                          poison_job("untargeted", untargeted, cfg.archs, True, True))
    if cfg.label_specific:
        jobs["label_specific"] = ({**common, "job": "label_specific", "generator": to_dict(label_specific)},
                                  poison_job("label_specific", label_specific, cfg.archs, True, True))
    for eps in cfg.eps_sweep:
        if abs(eps - untargeted.eps) < 1e-12:
            continue  # the untargeted job is this point of the sweep
        g = dataclasses.replace(untargeted, eps=eps)
        name = f"eps{eps:g}"
        jobs[name] = ({**common, "job": name, "generator": to_dict(g)},
                      poison_job(name, g, (untargeted.surrogate,), False, False))
    if only is not None:
        unknown = sorted(set(only) - set(jobs))
        if unknown:
            raise ConfigError(f"only: unknown job {unknown[0]!r}; jobs of this configuration: {', '.join(jobs)}")

    results: dict[str, Any] = {}
    for name, (key, run) in jobs.items():
        path = workdir / "jobs" / f"{name}.json"
        fp = _fingerprint(key)
        if not fresh and path.is_file():
            cached = json.loads(path.read_text())
            if cached.get("fingerprint") == fp:
                results[name] = cached
                continue
        if only is not None and name not in only:
            continue
        log.info("bench: running job %s", name)
        start = time.perf_counter()
        res = run()
        res.update(job=name, fingerprint=fp, key=key, git_revision=git_revision(),
                   job_seconds=round(time.perf_counter() - start, 1))
        atomic_write_json(path, res)
        results[name] = res
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
    any_job = next(iter(results.values()), None)
    if any_job is None:
        return "\n".join(lines + ["(no results)"])
    bench = any_job["key"]["bench"]
    recipes, split = bench["recipes"], bench["split"]
    lines += [f"Downstream seeds {bench['seeds']}; scored on the clean **{split}** split; "
              "figures are % (mean over seeds, min-max in brackets); revisions: "
              + ", ".join(sorted({f"{n} {r.get('git_revision')}" for n, r in results.items()})), ""]
    clean, unt, ls = results.get("clean"), results.get("untargeted"), results.get("label_specific")
    names = list((unt or clean or ls or {"models": {}})["models"])
    header = "| classifier | recipe | clean data: accuracy | untargeted poison: accuracy | label-specific poison: accuracy / target rate |"
    lines += ["**Clean test accuracy of classifiers trained on each dataset**", "", header, "|---|---|---|---|---|"]
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
    if MARK_BEGIN in text and MARK_END in text:
        head, rest = text.split(MARK_BEGIN, 1)
        text = head + block + rest.split(MARK_END, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    from poison.utils import atomic_write_bytes

    atomic_write_bytes(path, text.encode())


def generator_config(params: Params, overrides: dict[str, Any] | None, target: str) -> DeepConfuseConfig:
    """Return params.train_generator with JSON ``overrides`` applied and ``target`` set (validated)."""
    merged = to_dict(params.train_generator) | (overrides or {}) | {"target": target}
    if target == "untargeted":
        merged["target_map"] = None
    return from_dict(DeepConfuseConfig, merged, "train_generator")

