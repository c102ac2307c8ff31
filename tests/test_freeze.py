import pytest
import timm
import torch
from torch import nn

from tlkit import FreezePolicy, HeadReplacer
from tlkit.freeze import Phase, batchnorm_modules, parameter_groups
from tlkit.schedule import cosine_lr_factor


def resnet():
    torch.manual_seed(0)
    m = timm.create_model("test_resnet")
    HeadReplacer(3).apply(m)
    return m


def names_under(model, *prefixes):
    return {n for n, _ in model.named_parameters() if n.startswith(prefixes)}


def test_groups_follow_timm_group_matcher_with_head_last():
    m = resnet()
    groups = parameter_groups(m)
    assert [g.name for g in groups] == ["conv1+bn1", "layer1", "layer2", "layer3", "layer4", "head"]
    assert groups[-1].param_names == ("fc.weight", "fc.bias")
    flat = [n for g in groups for n in g.param_names]
    assert sorted(flat) == sorted(n for n, _ in m.named_parameters())  # each exactly once


def test_linear_probe_trains_exactly_the_head():
    m = resnet()
    assert FreezePolicy.linear_probe().apply(m) == {"fc.weight", "fc.bias"}
    assert {n for n, p in m.named_parameters() if p.requires_grad} == {"fc.weight", "fc.bias"}


def test_depth_positive_negative_and_zero():
    m = resnet()
    everything = {n for n, _ in m.named_parameters()}
    assert FreezePolicy.full_finetune().trainable_names(m) == everything
    assert FreezePolicy.freeze_to(2).trainable_names(m) == names_under(m, "layer2", "layer3", "layer4", "fc")
    assert FreezePolicy.freeze_to(-2).trainable_names(m) == names_under(m, "layer4", "fc")
    with pytest.raises(ValueError, match="no trainable parameter"):
        FreezePolicy.freeze_to(6).trainable_names(m)


def test_patterns_freeze_and_unfreeze():
    m = resnet()
    p = FreezePolicy(depth=0, freeze=["layer1.*", "layer2.*"], unfreeze=["layer2.0.conv1.*"])
    got = p.trainable_names(m)
    assert not got & names_under(m, "layer1")
    assert got & names_under(m, "layer2") == {"layer2.0.conv1.weight"}


def test_pattern_that_matches_nothing_is_an_error():
    with pytest.raises(ValueError, match="'blocks.*'"):
        FreezePolicy(freeze=["blocks.*"]).trainable_names(resnet())


def test_frozen_batchnorm_running_stats_never_move():
    m = resnet()
    FreezePolicy.linear_probe().apply(m)
    bns = batchnorm_modules(m)
    before = {n: (b.running_mean.clone(), b.running_var.clone()) for n, b in bns.items()}
    m.train()  # the user calls train() again: stats must still not move
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
    for _ in range(3):
        loss = m(torch.randn(4, 3, 32, 32) * 3 + 1).logsumexp(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    for n, b in bns.items():
        assert torch.equal(b.running_mean, before[n][0]), n
        assert torch.equal(b.running_var, before[n][1]), n


def test_follow_policy_trains_bn_in_trainable_groups_only():
    m = resnet()
    p = FreezePolicy.freeze_to(-2)  # layer4 + head train
    frozen = p.frozen_batchnorm_names(m)
    assert frozen == {n for n in batchnorm_modules(m) if not n.startswith("layer4")}
    p.apply(m)
    m.train()
    bn = m.get_submodule("layer4.0.bn1")
    before = bn.running_mean.clone()
    m(torch.randn(4, 3, 32, 32))
    assert not torch.equal(bn.running_mean, before)


def test_frozen_and_trainable_bn_policies():
    m = resnet()
    bn_params = {f"{n}.{p}" for n, mod in batchnorm_modules(m).items() for p, _ in mod.named_parameters()}
    full_frozen_bn = FreezePolicy(depth=0, batchnorm="frozen")
    assert not full_frozen_bn.trainable_names(m) & bn_params
    assert full_frozen_bn.frozen_batchnorm_names(m) == set(batchnorm_modules(m))
    probe_train_bn = FreezePolicy(depth=-1, batchnorm="trainable")
    assert probe_train_bn.trainable_names(m) == bn_params | {"fc.weight", "fc.bias"}
    assert probe_train_bn.frozen_batchnorm_names(m) == set()


def test_phases_override_only_what_they_set():
    p = FreezePolicy.linear_probe(layer_decay=0.5).then(2, depth=-3).then(4, layer_decay=0.9)
    assert p.at(0).depth == -1 and p.at(1).depth == -1
    assert p.at(2).depth == -3 and p.at(2).layer_decay == 0.5
    assert p.at(5).depth == -3 and p.at(5).layer_decay == 0.9
    assert p.boundaries() == [2, 4]
    with pytest.raises(ValueError, match="increasing"):
        FreezePolicy(phases=[Phase(epoch=3), Phase(epoch=2)])


def test_layer_wise_lr_decay():
    m = resnet()
    scales = FreezePolicy(layer_decay=0.5, backbone_lr_scale=0.1).lr_scales(m)
    assert scales["head"] == 1.0
    assert scales["layer4"] == pytest.approx(0.5 * 0.1)
    assert scales["conv1+bn1"] == pytest.approx(0.5 ** 5 * 0.1)
    groups = FreezePolicy(layer_decay=0.5).param_groups(m, lr=0.1, weight_decay=0.05)
    by = {(g["group"], g["weight_decay"]): g for g in groups}
    assert by[("layer3", 0.05)]["lr"] == pytest.approx(0.1 * 0.25)
    # Biases and norm weights get no weight decay (timm's convention).
    assert all(n.endswith(("bias", "weight")) for n in by[("layer3", 0.0)]["param_names"])
    assert all(m.get_parameter(n).ndim == 1 for n in by[("layer3", 0.0)]["param_names"])


def test_unfreeze_boundary_joins_optimizer_and_keeps_state():
    m = resnet()
    p = FreezePolicy.linear_probe().then(1, depth=-2)
    p.apply(m, 0)
    opt = torch.optim.AdamW(p.param_groups(m, 0, lr=0.1, weight_decay=0.1))
    x = torch.randn(4, 3, 32, 32)
    m.train()
    m(x).sum().backward()
    opt.step()
    head_state = {k: v.clone() for k, v in opt.state[m.fc.weight].items()}
    p.apply(m, 1)
    joined = p.sync_optimizer(opt, m, 1, lr=0.1, weight_decay=0.1)
    assert set(joined) == {n for n, _ in m.named_parameters() if n.startswith("layer4")}
    new_groups = [g for g in opt.param_groups if g["group"] == "layer4"]
    assert new_groups and all(g["lr"] == pytest.approx(0.1) for g in new_groups)
    for k, v in head_state.items():
        assert torch.equal(opt.state[m.fc.weight][k], v)  # head kept its moments
    assert m.layer4[0].conv1.weight not in opt.state  # fresh state for the newcomers


def test_refrozen_parameters_never_move_with_decay_or_momentum():
    m = resnet()
    p = FreezePolicy.freeze_to(-2).then(1, depth=-1)
    p.apply(m, 0)
    opt = torch.optim.SGD(p.param_groups(m, 0, lr=0.1, weight_decay=0.1), lr=0.1, momentum=0.9, weight_decay=0.1)
    m.train()
    m(torch.randn(4, 3, 32, 32)).sum().backward()
    opt.step()
    p.apply(m, 1)  # layer4 freezes; it still has momentum buffers
    p.sync_optimizer(opt, m, 1, lr=0.1, weight_decay=0.1)
    w = m.layer4[0].conv1.weight.detach().clone()
    for _ in range(2):
        opt.zero_grad()
        m(torch.randn(4, 3, 32, 32)).sum().backward()
        opt.step()
    assert torch.equal(m.layer4[0].conv1.weight, w)


def test_cosine_schedule_values():
    assert cosine_lr_factor(0, 100, 10) == pytest.approx(1 / 11)
    assert cosine_lr_factor(9, 100, 10) == pytest.approx(10 / 11)
    assert cosine_lr_factor(10, 100, 10) == pytest.approx(1.0)
    assert cosine_lr_factor(55, 100, 10) == pytest.approx(0.5)
    assert cosine_lr_factor(100, 100, 10, min_ratio=0.1) == pytest.approx(0.1)


def test_policy_roundtrips_through_json():
    p = FreezePolicy.linear_probe(batchnorm="frozen").then(2, depth=-4, layer_decay=0.5)
    assert FreezePolicy.model_validate_json(p.model_dump_json()) == p


# -- stages with one meaning on every family (issue: registry coverage) -------------------------

def _meta(name: str):
    import timm

    with torch.device("meta"):
        return timm.create_model(name, pretrained=False)


def test_group_matcher_that_raises_falls_back_to_feature_info_stages():
    from tlkit.freeze import parameter_groups

    model = _meta("rdnet_tiny")  # its group_matcher(coarse=True) asserts
    groups = parameter_groups(model)
    assert len(groups) >= 5 and groups[-1].name == "head"
    assert FreezePolicy.full_finetune().trainable_names(model) == {n for n, _ in model.named_parameters()}


@pytest.mark.parametrize("name", ["convnext_atto", "swin_tiny_patch4_window7_224", "densenet121", "resnetv2_50"])
def test_freeze_to_minus_two_trains_the_last_real_stage(name):
    from tlkit.freeze import parameter_groups

    model = _meta(name)
    groups = parameter_groups(model)
    last = groups[-2]
    # a stage has matrices, not only a trailing norm's 1-d scales
    params = dict(model.named_parameters())
    assert any(params[n].ndim > 1 for n in last.param_names)
    body = sum(p.numel() for n, p in params.items() if n not in groups[-1].param_names)
    trained = sum(params[n].numel() for n in FreezePolicy.freeze_to(-2).trainable_names(model)
                  if n not in groups[-1].param_names)
    assert trained / body > 0.05, (name, last.name, trained / body)


def test_model_without_group_matcher_gets_stages_from_feature_info():
    from tlkit.freeze import parameter_groups

    model = _meta("pit_ti_224")
    assert not hasattr(model, "group_matcher")  # none in timm 1.0.x: the fallback decides
    names = [g.name for g in parameter_groups(model)]
    assert names[-1] == "head" and len(names) >= 4


def test_no_weight_decay_wildcards_match_as_in_timm():
    model = _meta("xcit_nano_12_p16_224")
    assert "pos_embed.*" in model.no_weight_decay()
    groups = FreezePolicy().param_groups(model, weight_decay=0.05)
    decay_of = {n: g["weight_decay"] for g in groups for n in g["param_names"]}
    assert decay_of["pos_embed.token_projection.weight"] == 0.0
    assert decay_of["blocks.0.attn.qkv.weight"] == 0.05


def test_negative_depth_on_a_model_without_head_is_a_clear_error():
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3))
    with pytest.raises(ValueError, match="has no classifier"):
        FreezePolicy.linear_probe().trainable_names(m)


def test_check_epochs_names_a_phase_that_would_never_run():
    policy = FreezePolicy.linear_probe().then(2, depth=-2).then(5, depth=0)
    policy.check_epochs(6)  # the last phase runs in epoch 6 (index 5)
    with pytest.raises(ValueError, match="train.epochs is 5, so the freeze phase that starts at epoch 6 never runs; "
                                         "set train.epochs to at least 6"):
        policy.check_epochs(5)
    with pytest.raises(ValueError, match="starts at epoch 3 never runs; set train.epochs to at least 6"):
        policy.check_epochs(2)
