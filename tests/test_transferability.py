"""LogME against its definition, the linear-probe baseline, and ranking on real photos."""

import math

import numpy as np
import pytest
import torch
from conftest import copy_sample

from tlkit import BackboneConfig, ImageFolderDataset
from tlkit.transferability import logme, probe_accuracy, rank_backbones


def _evidence_by_grid(f, y):
    """The same quantity by brute force: the log evidence of Bayesian linear regression,
    maximised over a log grid of (alpha, beta), computed with dense matrices."""
    n, d = f.shape
    best = -math.inf
    for alpha in np.logspace(-4, 4, 81):
        for beta in np.logspace(-4, 4, 81):
            a = alpha * np.eye(d) + beta * f.T @ f
            m = beta * np.linalg.solve(a, f.T @ y)
            e = (d / 2 * math.log(alpha) + n / 2 * math.log(beta) - 0.5 * np.linalg.slogdet(a)[1]
                 - beta / 2 * np.sum((f @ m - y) ** 2) - alpha / 2 * m @ m - n / 2 * math.log(2 * math.pi))
            best = max(best, e)
    return best / n


def test_logme_is_the_maximised_evidence_of_bayesian_linear_regression():
    rng = np.random.default_rng(0)
    f = rng.normal(size=(40, 5))
    labels = (f[:, 0] + 0.5 * rng.normal(size=40) > 0).astype(int)
    want = np.mean([_evidence_by_grid(f, (labels == k).astype(float)) for k in (0, 1)])
    assert logme(f, labels) == pytest.approx(want, abs=2e-3)  # the grid is 0.1 decades wide


def test_logme_prefers_features_that_separate_the_classes():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, size=300)
    good = np.eye(3)[y] * 3 + rng.normal(size=(300, 3)) * 0.5
    noise = rng.normal(size=(300, 3))
    assert logme(good, y) > logme(noise, y) + 0.5
    with pytest.raises(ValueError, match="N >= 2"):
        logme(np.zeros((1, 3)), np.zeros(1))


def test_probe_accuracy_is_perfect_on_separable_and_chance_on_noise():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(300) % 3
    assert probe_accuracy(torch.eye(3)[y] + 0.05 * torch.randn(300, 3, generator=g), y) == 1.0
    assert probe_accuracy(torch.randn(300, 8, generator=g), y) < 0.6


def test_rank_backbones_scores_real_photos_and_sorts_by_logme(tmp_path):
    data = ImageFolderDataset(copy_sample(tmp_path / "d", ("cardboard", "glass", "metal"), 4))
    small = {"input_size": (3, 64, 64)}
    results = rank_backbones(data, [BackboneConfig(name=n, pretrained=False, data_config=small)
                                    for n in ("test_resnet", "test_efficientnet")], device="cpu")
    assert [r.logme for r in results] == sorted((r.logme for r in results), reverse=True)
    assert {r.name for r in results} == {"test_resnet", "test_efficientnet"}
    assert all(r.weights == "random" and 0 <= r.probe_top1 <= 1 and r.num_features > 0 for r in results)


def test_cli_rank_prints_one_json_line_per_backbone_best_first(tmp_path, capsys):
    import json

    from tlkit.cli import main

    data = copy_sample(tmp_path / "d", ("cardboard", "glass", "metal"), 3)
    listing = tmp_path / "backbones.yaml"
    listing.write_text("- {name: test_resnet, pretrained: false, data_config: {input_size: [3, 64, 64]}}\n"
                       "- {name: test_efficientnet, pretrained: false, data_config: {input_size: [3, 64, 64]}}\n")
    assert main(["rank", "--data", str(data), "--backbones", str(listing), "--device", "cpu", "--format", "json"]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [r["name"] for r in rows] == [r["name"] for r in sorted(rows, key=lambda r: -r["logme"])]
    assert len(rows) == 2
    assert main(["rank", "--data", str(data)]) == 2
    assert "name at least one backbone" in capsys.readouterr().err


def test_rank_reads_each_photo_once_and_gives_each_backbone_its_own_eval_view(tmp_path, monkeypatch):
    import tlkit.data
    from tlkit._runtime import Runtime
    from tlkit.backbone import create_backbone, resolve_data_config
    from tlkit.data import create_transforms, eval_resize_size
    from tlkit.transferability import _features, _prepare

    data = ImageFolderDataset(copy_sample(tmp_path / "d", ("cardboard", "glass", "metal"), 3))
    configs = [BackboneConfig(name="test_resnet", pretrained=False, data_config={"input_size": (3, 64, 64)}),
               BackboneConfig(name="test_efficientnet", pretrained=False,
                              data_config={"input_size": (3, 80, 96), "crop_pct": 1.0})]
    decoded = []
    real = tlkit.data.load_image
    monkeypatch.setattr(tlkit.data, "load_image", lambda path, **kw: decoded.append(path) or real(path, **kw))
    rt = Runtime(torch.device("cpu"), None, False)  # float32: compared exactly below
    torch.manual_seed(0)
    feats, y = _features([_prepare(c, rt) for c in configs], data, rt, batch_size=4, num_workers=0)
    assert sorted(decoded) == sorted(p for p, _ in data.samples)  # one decode per file for both backbones
    assert y.tolist() == [label for _, label in data.samples]

    # Each backbone on its own (same seed, so the same random init), one photo at a time
    # through its own eval transform: the same features.
    torch.manual_seed(0)
    models = [create_backbone(c).eval() for c in configs]
    # One JPEG draft decode serves both: at the larger of the two eval resize sizes.
    draft = max(eval_resize_size(resolve_data_config(m, c.data_config)) for m, c in zip(models, configs))
    assert draft == 80
    for config, model, f in zip(configs, models, feats):
        _, transform = create_transforms(resolve_data_config(model, config.data_config))
        x = torch.stack([transform(real(p, draft_size=draft)) for p, _ in data.samples])
        assert tuple(x.shape[-2:]) == config.data_config.input_size[1:]
        with torch.no_grad():
            expected = model.forward_head(model.forward_features(x), pre_logits=True)
        torch.testing.assert_close(f, expected, rtol=1e-4, atol=1e-5)
    assert len(rank_backbones(data, configs, device="cpu", num_workers=0)) == 2
