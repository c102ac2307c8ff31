"""Temperature scaling, ECE and the reject threshold, on synthetic outputs with known answers (issue 25)."""

import pytest
import torch
from conftest import copy_sample, tiny_tuner

from tlkit.calibration import calibration_summary, expected_calibration_error, fit_temperature, reject_threshold


def _calibrated_data(n=20_000, classes=5, seed=0):
    """Logits z and labels drawn from softmax(z): a perfectly calibrated model."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, classes, generator=g) * 2.0
    y = torch.multinomial(z.softmax(1), 1, generator=g).squeeze(1)
    return z, y


@pytest.mark.parametrize("true_t", [0.5, 1.0, 3.0])
def test_a_model_over_or_under_confident_by_a_known_temperature_gets_it_back(true_t):
    z, y = _calibrated_data()
    # The model's logits are the calibrated ones times T: over-confident for T > 1.
    fitted = fit_temperature(z * true_t, y)
    assert fitted == pytest.approx(true_t, rel=0.05)


def test_ece_is_zero_for_a_calibrated_model_and_large_for_an_overconfident_one():
    z, y = _calibrated_data()
    assert expected_calibration_error(z.softmax(1), y) < 0.02
    assert expected_calibration_error((z * 4).softmax(1), y) > 0.1
    # Scaling by the fitted temperature removes most of the over-confidence.
    summary = calibration_summary((z * 4).log_softmax(1), y)
    assert summary["temperature"] == pytest.approx(4.0, rel=0.05) and summary["ece"] < 0.02 < summary["ece_raw"]


def test_the_reject_threshold_answers_the_chosen_share():
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.55, 0.45], [0.7, 0.3]])
    assert reject_threshold(probs, coverage=0.8) == pytest.approx(0.6)  # 4 of 5 at least this sure
    assert reject_threshold(probs, coverage=1.0) == pytest.approx(0.55)
    assert reject_threshold(torch.zeros(0, 2)) == 0.0


def test_fit_records_calibration_and_predict_says_not_sure_below_the_threshold(tmp_path):
    from tlkit import FineTuner, ImageFolderDataset

    classes = ["cardboard", "glass", "metal"]
    train = ImageFolderDataset(copy_sample(tmp_path / "train", classes, 4))
    val = ImageFolderDataset(copy_sample(tmp_path / "val", classes, 3, offset=10))
    tuner = tiny_tuner(classes, output_dir=tmp_path / "run", epochs=2)
    history = tuner.fit(train, val)
    assert {"temperature", "ece", "ece_raw", "reject_threshold"} <= set(history[-1])
    loaded = FineTuner.load(tmp_path / "run", device="cpu", progress=False)
    best = next(r for r in history if r["epoch"] == tuner.best["epoch"])
    assert loaded.calibration == {"temperature": best["temperature"], "reject_threshold": best["reject_threshold"]}
    photos = [p for p, _ in val.samples]
    preds = loaded.predict(photos)
    # Temperature-scaled probabilities: log p = log_softmax(logits / T).
    x = torch.stack([loaded.prepare_input(p) for p in photos])
    with torch.no_grad():
        expected = (loaded.model.eval()(x) / best["temperature"]).softmax(1)
    assert [p.probability for p in preds] == pytest.approx(expected.max(1).values.tolist(), abs=1e-5)
    assert [p.sure for p in preds] == [p.probability >= best["reject_threshold"] for p in preds]
    assert sum(p.sure for p in preds) >= round(0.8 * len(preds)) - 1  # about 80% of val-like photos answered
    loaded.calibration = {"temperature": 1.0, "reject_threshold": 1.0}  # nothing is sure enough
    assert {p.answer for p in loaded.predict(photos)} == {"not sure"}
