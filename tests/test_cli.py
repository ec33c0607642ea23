"""poison.cli: `poison verify`, `poison inspect`, `poison run`, called in-process."""

from __future__ import annotations

import shutil

import pytest
import torch
import yaml

from conftest import tiny_params_dict
from poison.card import GENERATOR_HAZARD
from poison.cli import main
from poison.shards import read_manifest

PNG = b"\x89PNG\r\n\x1a\n"


def test_verify_good_dataset(clean_dataset, capsys):
    assert main(["verify", str(clean_dataset)]) == 0
    out = capsys.readouterr().out
    assert "OK" in out and "300 samples" in out


def test_verify_names_the_truncated_shard(clean_dataset, tmp_path, capsys):
    copy = tmp_path / "clean"
    shutil.copytree(clean_dataset, copy)
    bad = copy / "train-000001.tar"
    bad.write_bytes(bad.read_bytes()[:1000])
    assert main(["verify", str(copy)]) == 1
    err = capsys.readouterr().err
    assert "train-000001.tar" in err and "1 bad shard" in err
    assert "train-000000.tar" not in err


def test_verify_folder_without_manifest(tmp_path, capsys):
    assert main(["verify", str(tmp_path)]) == 1
    assert "no manifest" in capsys.readouterr().err


def test_inspect_poisoned_dataset(poisoned_dataset, clean_dataset, tmp_path, capsys):
    out_png = tmp_path / "grid.png"
    assert main(["inspect", str(poisoned_dataset), "--clean", str(clean_dataset), "--out", str(out_png)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("POISONED DATA")
    assert "kind: poisoned" in out and "method: deepconfuse" in out and "eps: 0.3" in out
    assert "train: 210 samples" in out
    assert out_png.read_bytes()[:8] == PNG


def test_inspect_refuses_a_clean_set_it_was_not_made_from(poisoned_dataset, clean_dataset, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(clean_dataset, other)
    manifest = other / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"seed": 0', '"seed": 1'))
    code = main(["inspect", str(poisoned_dataset), "--clean", str(other), "--out", str(tmp_path / "g.png")])
    assert code == 1
    assert "manifest sha256 differs" in capsys.readouterr().err
    assert not (tmp_path / "g.png").exists()


def test_inspect_augmented_dataset_pairs_each_sample_with_its_clean_source(augmented_dataset, clean_dataset, tmp_path,
                                                                         capsys, monkeypatch):
    import poison.report
    from poison.shards import load_split

    seen = {}
    original = poison.report.save_sample_grid

    def spy(images, labels, clean, classes, out, manifest):
        seen["clean"] = clean
        return original(images, labels, clean, classes, out, manifest)

    monkeypatch.setattr(poison.report, "save_sample_grid", spy)
    out_png = tmp_path / "sia.png"
    # its splits are 'adversarial' and 'longtail', which the clean set does not have: pairs come by source_key
    assert main(["inspect", str(augmented_dataset), "--clean", str(clean_dataset), "--out", str(out_png)]) == 0
    assert "kind: semantic" in capsys.readouterr().out and out_png.read_bytes()[:8] == PNG
    _, _, metas = load_split(augmented_dataset, "adversarial")
    clean_x, _, clean_meta = load_split(clean_dataset, "train")
    index = {f"train_{i:08d}": i for i in range(len(clean_meta))}
    assert seen["clean"].shape[0] == len(metas)
    assert all(bool((seen["clean"][j] == clean_x[index[m["source_key"]]]).all()) for j, m in enumerate(metas))


def test_inspect_clean_dataset(clean_dataset, tmp_path, capsys):
    out_png = tmp_path / "clean.png"
    assert main(["inspect", str(clean_dataset), "--out", str(out_png)]) == 0
    out = capsys.readouterr().out
    assert "POISONED" not in out and "kind: clean" in out and "method: None" in out
    assert "test: 60 samples" in out
    assert out_png.read_bytes()[:8] == PNG


def test_inspect_generator_checkpoint_prints_its_hazard(generator_checkpoint, tmp_path, capsys):
    assert main(["inspect", str(generator_checkpoint)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(GENERATOR_HAZARD)
    assert "generator: test_autoencoder" in out and "target: untargeted" in out and "eps: 0.3" in out
    # a checkpoint written before the hazard field is still a generator and is labelled as one
    ckpt = torch.load(generator_checkpoint, weights_only=True)
    del ckpt["hazard"]
    old = tmp_path / "old.pt"
    torch.save(ckpt, old)
    assert main(["inspect", str(old)]) == 0
    assert capsys.readouterr().out.startswith(GENERATOR_HAZARD)


def test_inspect_refuses_a_file_that_is_not_a_checkpoint(tmp_path, capsys):
    bad = tmp_path / "notes.pt"
    bad.write_text("not a checkpoint")
    assert main(["inspect", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "notes.pt" in err and "rerun train_generator" in err
    assert main(["inspect", str(tmp_path / "missing.pt")]) == 1
    assert "no generator checkpoint" in capsys.readouterr().err


def test_run_prepare_from_a_params_file(tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(tiny_params_dict(tmp_path)))
    assert main(["run", "--params", str(params), "--stages", "prepare"]) == 0
    assert "prepare:" in capsys.readouterr().out
    m = read_manifest(tmp_path / "data" / "shards" / "mnist5k")
    assert {k: v["samples"] for k, v in m["splits"].items()} == {"train": 210, "val": 30, "test": 60}


def test_run_with_a_bad_params_file_reports_the_key(tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(tiny_params_dict(tmp_path, train_generator={"eps": 2})))
    assert main(["run", "--params", str(params)]) == 1
    assert "train_generator.eps" in capsys.readouterr().err
    assert not (tmp_path / "data").exists()


def test_unknown_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        main(["explode"])
    assert info.value.code == 2


def test_verify_a_file_url_and_an_http_prefix_naming_the_bad_shard(clean_dataset, tmp_path, capsys):
    import functools
    import http.server
    import shutil
    import threading

    copy = tmp_path / "c"
    shutil.copytree(clean_dataset, copy)
    assert main(["verify", copy.as_uri()]) == 0
    shard = copy / "train-000001.tar"
    shard.write_bytes(shard.read_bytes()[:-512])
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(
        type("Q", (http.server.SimpleHTTPRequestHandler,), {"log_message": lambda *a: None}), directory=str(tmp_path)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        capsys.readouterr()
        assert main(["verify", f"http://127.0.0.1:{server.server_address[1]}/c"]) == 1
        err = capsys.readouterr().err
        assert "BAD" in err and "train-000001.tar" in err and "1 bad shard" in err
    finally:
        server.shutdown()
        server.server_close()


def test_inspect_given_a_manifest_file_says_to_pass_its_folder(clean_dataset, tmp_path, capsys):
    code = main(["inspect", str(clean_dataset / "manifest.json"), "--out", str(tmp_path / "g.png")])
    err = capsys.readouterr().err
    assert code == 1 and "pass the dataset folder, not its manifest" in err and f"poison inspect {clean_dataset}" in err
    assert not (tmp_path / "g.png").exists()


def test_inspect_of_a_damaged_dataset_prints_only_the_error(clean_dataset, tmp_path, capsys):
    # no header that reads as a good dataset above the error
    damaged = tmp_path / "damaged"
    shutil.copytree(clean_dataset, damaged)
    shard = sorted(damaged.glob("train-*.tar"))[0]
    shard.write_bytes(shard.read_bytes()[:-1024])
    code = main(["inspect", str(damaged), "--out", str(tmp_path / "g.png")])
    captured = capsys.readouterr()
    assert code == 1 and shard.name in captured.err
    assert captured.out == "" and not (tmp_path / "g.png").exists()
