"""poison.evaluate: confusion matrices and metrics on hand-made predictions; downstream training."""

from __future__ import annotations

import pytest
import torch

from poison.evaluate import classification_metrics, confusion_matrix, save_confusion_png, summarise, train_and_test
from poison.train import TrainConfig


def test_confusion_matrix_rows_true_columns_predicted():
    pred = torch.tensor([0, 1, 1, 2, 2, 0])
    true = torch.tensor([0, 1, 2, 2, 2, 1])
    cm = confusion_matrix(pred, true, 3)
    assert cm.tolist() == [[1, 0, 0], [1, 1, 0], [0, 1, 2]]
    assert int(cm.sum()) == 6


def test_confusion_matrix_keeps_unseen_classes():
    cm = confusion_matrix(torch.tensor([1]), torch.tensor([1]), 4)
    assert cm.shape == (4, 4) and cm[1, 1] == 1 and int(cm.sum()) == 1


def test_classification_metrics_hand_made():
    pred = torch.tensor([0, 1, 1, 2, 2, 0])
    true = torch.tensor([0, 1, 2, 2, 2, 1])
    m = classification_metrics(pred, true, 4)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["per_class_accuracy"][:3] == pytest.approx([1.0, 0.5, 2 / 3])
    assert m["per_class_accuracy"][3] is None  # class 3 absent from the test split: no accuracy, not 0
    assert m["confusion_matrix"][2] == [0, 1, 2, 0]
    assert m["samples"] == 6
    assert "target_rate" not in m


def test_classification_metrics_target_rate():
    true = torch.tensor([0, 1, 2, 2])
    pred = torch.tensor([1, 2, 1, 0])
    shift = torch.tensor([1, 2, 0])  # y -> y + 1 mod 3
    m = classification_metrics(pred, true, 3, target_map=shift)
    assert m["accuracy"] == 0.0
    assert m["target_rate"] == pytest.approx(0.75)  # 0->1, 1->2, 2->0 hit; 2->1 missed
    m2 = classification_metrics(true, true, 3, target_map=shift)
    assert m2["accuracy"] == 1.0 and m2["target_rate"] == 0.0


def test_summarise_over_seeds():
    runs = [{"accuracy": 0.5, "target_rate": 0.2}, {"accuracy": 0.7, "target_rate": 0.4}]
    s = summarise(runs)
    assert s["accuracy_mean"] == pytest.approx(0.6)
    assert (s["accuracy_min"], s["accuracy_max"]) == (0.5, 0.7)
    assert s["target_rate_mean"] == pytest.approx(0.3) and (s["target_rate_min"], s["target_rate_max"]) == (0.2, 0.4)
    assert "target_rate_mean" not in summarise([{"accuracy": 1.0}])


def _separable(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Class 0 dark images, class 1 bright images."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = torch.randint(0, 60, (n, 1, 28, 28), dtype=torch.uint8, generator=g)
    x[y == 1] += 190
    return x, y


def test_train_and_test_learns_an_easy_task_deterministically():
    x_tr, y_tr = _separable(64, 0)
    x_te, y_te = _separable(20, 1)
    recipe = TrainConfig(optimizer="adam", lr=0.01, epochs=2, batch_size=16)
    rng = torch.get_rng_state()
    kw = dict(arch="test_cnn", recipe=recipe, num_classes=2, device=torch.device("cpu"))
    a = train_and_test(x_tr, y_tr, x_te, y_te, seed=0, **kw)
    b = train_and_test(x_tr, y_tr, x_te, y_te, seed=0, **kw)
    assert torch.equal(torch.get_rng_state(), rng)
    assert a == b
    assert a["accuracy"] >= 0.9
    assert a["samples"] == 20 and sum(map(sum, a["confusion_matrix"])) == 20


def test_save_confusion_png(tmp_path):
    path = tmp_path / "sub" / "cm.png"
    save_confusion_png([[3, 1], [0, 4]], ["a", "b"], path, "title")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in path.parent.iterdir()] == ["cm.png"]  # no temporary left behind
