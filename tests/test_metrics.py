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


# Multi-label metrics against scikit-learn (an independent implementation).
@pytest.mark.parametrize("seed", range(4))
def test_average_precision_matches_scikit_learn_with_ties(seed):
    from sklearn.metrics import average_precision_score

    from tlkit.metrics import average_precision

    g = torch.Generator().manual_seed(seed)
    y = (torch.rand(300, generator=g) < 0.3).long()
    scores = torch.round((0.4 * y + torch.rand(300, generator=g)) * 10) / 10  # coarse: many ties
    assert average_precision(scores, y) == pytest.approx(average_precision_score(y.numpy(), scores.numpy()))
    assert average_precision(scores, torch.zeros(300)) is None


@pytest.mark.parametrize("seed", range(4))
def test_multilabel_metrics_match_scikit_learn(seed):
    import numpy as np
    from sklearn.metrics import average_precision_score

    from tlkit.metrics import MultiLabelMetrics

    g = torch.Generator().manual_seed(seed)
    targets = (torch.rand(120, 5, generator=g) < torch.tensor([0.5, 0.3, 0.1, 0.05, 0.0])).float()
    probs = (0.35 * targets + 0.65 * torch.rand(120, 5, generator=g)).float()
    thresholds = [0.5, 0.4, 0.6, 0.3, 0.99]
    m = MultiLabelMetrics(list("abcde"), probs, targets, thresholds)
    pred = (probs.numpy() >= np.array(thresholds, dtype=np.float32)).astype(int)
    y = targets.numpy().astype(int)
    with_positives = y.sum(0) > 0
    expected_ap = average_precision_score(y[:, with_positives], probs.numpy()[:, with_positives], average=None)
    assert [v for v in m.per_label_ap.values() if v is not None] == pytest.approx(list(expected_ap))
    assert m.map == pytest.approx(float(np.mean(expected_ap)))
    # A label neither true nor predicted is left out of the macro mean: scikit-learn's zero_division=nan.
    assert m.macro_f1 == pytest.approx(f1_score(y, pred, average="macro", zero_division=np.nan))
    assert m.micro_f1 == pytest.approx(f1_score(y, pred, average="micro"))
    per_label = f1_score(y, pred, average=None, zero_division=np.nan)
    ours = [np.nan if v is None else v for v in m.per_label_f1.values()]
    assert np.allclose(ours, per_label, equal_nan=True)


def test_tuned_thresholds_reach_the_best_f1_scikit_learn_finds():
    import numpy as np

    from tlkit.metrics import tune_thresholds

    g = torch.Generator().manual_seed(0)
    targets = (torch.rand(200, 3, generator=g) < torch.tensor([0.5, 0.2, 0.0])).float()
    probs = 0.3 * targets + 0.7 * torch.rand(200, 3, generator=g)
    chosen = tune_thresholds(probs, targets)
    for c in range(2):
        p, y = probs[:, c].numpy(), targets[:, c].numpy().astype(int)
        best = max(f1_score(y, (p >= t).astype(int)) for t in np.unique(p))
        assert f1_score(y, (p >= chosen[c]).astype(int)) == pytest.approx(best)
    assert chosen[2] == 0.5  # no positive: left at 0.5
