import pytest
import torch
from sklearn.metrics import confusion_matrix as sk_confusion
from sklearn.metrics import f1_score, recall_score

from tlkit import ClassificationMetrics

CLASSES = ["a", "b", "c", "d"]


def test_hand_computed_example():
    targets = [0, 0, 0, 1, 1, 2]
    preds = [0, 0, 1, 1, 2, 2]
    m = ClassificationMetrics.from_predictions(targets, preds, CLASSES)
    assert m.matrix.tolist() == [[2, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    assert m.n == 6
    assert m.top1 == pytest.approx(4 / 6)
    assert m.per_class_recall == {"a": pytest.approx(2 / 3), "b": 0.5, "c": 1.0, "d": None}
    # F1: a = 2*2/(3+2) = 0.8, b = 2*1/(2+2) = 0.5, c = 2*1/(1+2) = 2/3; d absent everywhere.
    assert m.macro_f1 == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)


@pytest.mark.parametrize("seed", range(5))
def test_matches_scikit_learn(seed):
    g = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, 4, (200,), generator=g)
    preds = torch.where(torch.rand(200, generator=g) < 0.6, targets, torch.randint(0, 4, (200,), generator=g))
    m = ClassificationMetrics.from_predictions(targets, preds, CLASSES)
    assert m.matrix.tolist() == sk_confusion(targets, preds, labels=range(4)).tolist()
    assert m.macro_f1 == pytest.approx(f1_score(targets, preds, average="macro"))
    recalls = recall_score(targets, preds, average=None, labels=range(4))
    assert list(m.per_class_recall.values()) == pytest.approx(list(recalls))


def test_to_dict_keys():
    d = ClassificationMetrics.from_predictions([0, 1], [0, 0], CLASSES, loss=0.5).to_dict()
    assert set(d) == {"n", "top1", "macro_f1", "per_class_recall", "confusion_matrix", "classes", "loss"}
