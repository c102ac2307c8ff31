"""Weight averaging: WiSE-FT interpolation and uniform soups (issue 25)."""

import pytest
import timm
import torch
from conftest import copy_sample, tiny_tuner

from tlkit.soup import greedy_soup, interpolate, uniform_soup


def _state(seed):
    torch.manual_seed(seed)
    return timm.create_model("test_resnet").state_dict()


def test_a_soup_of_identical_models_is_the_model():
    s = _state(0)
    soup = uniform_soup([s, {k: v.clone() for k, v in s.items()}, {k: v.clone() for k, v in s.items()}])
    assert all(torch.equal(soup[k], s[k]) for k in s)


def test_interpolation_ends_are_the_two_models_and_its_middle_is_their_soup():
    a, b = _state(0), _state(1)
    assert all(torch.equal(interpolate(a, b, 0.0)[k], a[k]) for k in a if a[k].is_floating_point())
    assert all(torch.equal(interpolate(a, b, 1.0)[k], b[k]) for k in a)
    mid, soup = interpolate(a, b, 0.5), uniform_soup([a, b])
    assert all(torch.allclose(mid[k].float(), soup[k].float()) for k in a)
    with pytest.raises(ValueError, match="alpha"):
        interpolate(a, b, 1.5)
    with pytest.raises(ValueError, match="other tensors"):
        uniform_soup([a, _state_of("test_efficientnet")])


def _state_of(name):
    return timm.create_model(name).state_dict()


def test_wise_ft_ships_the_interpolation_of_the_probe_and_the_fine_tuned_weights(tmp_path):
    from tlkit import FreezePolicy, ImageFolderDataset
    from tlkit.checkpoint import load_checkpoint

    classes = ["cardboard", "glass", "metal"]
    train = ImageFolderDataset(copy_sample(tmp_path / "train", classes, 4))
    policy = FreezePolicy.linear_probe().then(1, depth=0)
    anchors = []

    tuned = tiny_tuner(classes, output_dir=tmp_path / "plain", epochs=3, policy=policy)
    tuned.fit(train)
    wise = tiny_tuner(classes, output_dir=tmp_path / "wise", epochs=3, policy=policy, wise_ft=0.5)
    wise.fit(train)
    anchors.append(wise.wise_anchor)
    # The same seed trains the same raw weights; WiSE-FT only changes what is kept.
    plain_final = tuned.model.state_dict()
    expected = interpolate(wise.wise_anchor, plain_final, 0.5)
    kept = wise.model.state_dict()
    assert all(torch.allclose(kept[k].float(), expected[k].float(), atol=1e-6) for k in kept)
    written, _ = load_checkpoint(tmp_path / "wise" / "last.safetensors")
    assert all(torch.allclose(written[k].float(), expected[k].float(), atol=1e-6) for k in written)
    # The anchor is the linear probe: the backbone as pretrained (here: initialised), the head trained.
    start = tiny_tuner(classes, policy=policy).model.state_dict()
    first = next(iter(start))  # the stem's convolution
    assert torch.equal(wise.wise_anchor[first], start[first])
    assert not torch.equal(wise.wise_anchor["fc.weight"], start["fc.weight"])


def test_cli_soup_averages_checkpoints_and_refuses_other_runs(tmp_path, capsys):
    from tlkit import FineTuner
    from tlkit.checkpoint import load_checkpoint
    from tlkit.cli import main

    classes = ["cardboard", "glass", "metal"]
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        tuner = tiny_tuner(classes)
        with torch.no_grad():
            for p in tuner.model.parameters():
                p.add_(0.01 * seed)
        paths.append(tuner.save(tmp_path / f"m{seed}.safetensors"))
    assert main(["soup", "--checkpoint", str(paths[0]), "--checkpoint", str(paths[1]),
                 "--output", str(tmp_path / "soup.safetensors")]) == 0
    soup, _ = load_checkpoint(tmp_path / "soup.safetensors")
    expected = uniform_soup([load_checkpoint(p)[0] for p in paths])
    assert all(torch.equal(soup[k], expected[k]) for k in soup)
    assert FineTuner.load(tmp_path / "soup.safetensors").checkpoint_metadata["metrics"] == {"soup_models": 2}
    other = tiny_tuner(["a", "b"]).save(tmp_path / "other.safetensors")
    assert main(["soup", "--checkpoint", str(paths[0]), "--checkpoint", str(other),
                 "--output", str(tmp_path / "bad.safetensors")]) == 2
    assert "differ in" in capsys.readouterr().err and not (tmp_path / "bad.safetensors").exists()


def test_greedy_soup_keeps_what_does_not_lower_the_score():
    # Scalar "models" w with score -|w - 0.4|: alone 0 scores -0.4, 1 scores -0.6, 10 scores -9.6.
    # Soup {0, 1} = 0.5 scores -0.1 (kept); adding 10 gives 3.67 (refused).
    states = [{"w": torch.tensor([v])} for v in (1.0, 10.0, 0.0)]
    calls = []

    def score(state):
        calls.append(float(state["w"]))
        return -abs(float(state["w"]) - 0.4)

    soup, kept = greedy_soup(states, score)
    assert kept == [2, 0] and torch.allclose(soup["w"], torch.tensor([0.5]))
    assert len(calls) == 2 * len(states) - 1
    same = _state(0)
    soup, kept = greedy_soup([same, {k: v.clone() for k, v in same.items()}], lambda s: 1.0)
    assert kept == [0, 1] and all(torch.equal(soup[k], same[k]) for k in same)
    with pytest.raises(ValueError, match="at least one"):
        greedy_soup([], score)


def test_cli_greedy_soup_drops_a_checkpoint_that_lowers_validation_top1(tmp_path, capsys):
    import json

    from tlkit.checkpoint import load_checkpoint
    from tlkit.cli import main

    classes = ["cardboard", "glass", "metal"]
    val = copy_sample(tmp_path / "val", classes[:2], per_class=2)  # no metal photo
    paths = []
    # Heads whose output is their bias: "good" always answers cardboard (top-1 0.5 on val), "bad"
    # always metal (0.0); their soup's bias [50, 0, 150] answers metal (0.0), so greedy drops "bad".
    for name, bias in (("good", [100.0, 0.0, 0.0]), ("bad", [0.0, 0.0, 300.0])):
        tuner = tiny_tuner(classes)
        with torch.no_grad():
            tuner.model.get_classifier().weight.zero_()
            tuner.model.get_classifier().bias.copy_(torch.tensor(bias))
        paths.append(tuner.save(tmp_path / f"{name}.safetensors"))
    assert main(["soup", "--checkpoint", str(paths[1]), "--checkpoint", str(paths[0]), "--greedy", str(val),
                 "--output", str(tmp_path / "greedy.safetensors")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["kept"] == [str(paths[0])] and out["models"] == 1
    soup, _ = load_checkpoint(tmp_path / "greedy.safetensors")
    assert all(torch.equal(soup[k], load_checkpoint(paths[0])[0][k]) for k in soup)
