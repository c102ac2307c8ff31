import pytest
import timm
import torch
from torch import nn

from tlkit import FineTuner, FreezePolicy, HeadReplacer
from tlkit.freeze import parameter_groups
from tlkit.head import TaskHead, check_head_width, classifier_param_names, head_width

# (model, classifier module names, pre-logit width) - widths from the architectures' definitions.
FAMILIES = [
    ("mobilenetv2_100", ["classifier"], 1280),
    ("resnet18", ["fc"], 512),
    ("efficientnet_b0", ["classifier"], 1280),
    ("tf_efficientnet_lite0", ["classifier"], 1280),
    ("convnext_atto", ["head.fc"], 320),
    ("regnetx_002", ["head.fc"], 368),
    ("vit_tiny_patch16_224", ["head"], 192),
    ("deit_tiny_distilled_patch16_224", ["head", "head_dist"], 192),
]


@pytest.fixture(scope="module")
def x():
    torch.manual_seed(0)
    return torch.randn(2, 3, 224, 224)


@pytest.mark.parametrize("name,heads,width", FAMILIES, ids=[f[0] for f in FAMILIES])
@pytest.mark.parametrize("hidden", [None, 16], ids=["linear", "hidden"])
def test_head_contract(name, heads, width, hidden, x):
    model = timm.create_model(name).eval()
    with torch.no_grad():
        before = model.forward_head(model.forward_features(x), pre_logits=True)
    HeadReplacer(num_classes=6, dropout=0.1 if hidden else 0.0, hidden_dim=hidden).apply(model)
    assert model.num_classes == 6
    with torch.no_grad():
        logits = model(x)
        pre = model.forward_head(model.forward_features(x), pre_logits=True)
    assert logits.shape == (2, 6)
    assert pre.shape == (2, width)
    # Pooling and norm before the classifier are untouched.
    torch.testing.assert_close(pre, before)
    expected = set()
    for h in heads:
        module = model.get_submodule(h)
        if hidden:
            assert isinstance(module, TaskHead) and module.hidden.out_features == hidden
            expected |= {f"{h}.hidden.weight", f"{h}.hidden.bias", f"{h}.fc.weight", f"{h}.fc.bias"}
        else:
            assert isinstance(module, nn.Linear) and module.in_features == width
            expected |= {f"{h}.weight", f"{h}.bias"}
    assert set(classifier_param_names(model)) == expected
    # Linear probe trains exactly the new head.
    assert FreezePolicy.linear_probe().apply(model) == expected
    assert all(p.requires_grad for n, p in model.named_parameters() if n in expected)


def test_head_follows_backbone_dtype():
    model = timm.create_model("test_resnet").to(torch.bfloat16)
    HeadReplacer(3).apply(model)
    assert model.get_classifier().weight.dtype == torch.bfloat16
    out = model(torch.randn(1, 3, 64, 64, dtype=torch.bfloat16))
    assert out.shape == (1, 3) and out.dtype == torch.bfloat16


def test_conv_classifier_keeps_flatten():
    # DLA's classifier is a 1x1 Conv2d followed by the model's own flatten.
    model = timm.create_model("dla46_c").eval()
    HeadReplacer(4).apply(model)
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 4)


def test_num_classes_zero_model_gets_a_head():
    model = timm.create_model("test_resnet", num_classes=0)
    HeadReplacer(5).apply(model)
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 5)
    assert model.get_classifier().in_features == model.num_features


def test_parameter_count_of_hidden_head():
    model = timm.create_model("resnet18")
    HeadReplacer(6, hidden_dim=32).apply(model)
    head = model.get_classifier()
    assert sum(p.numel() for p in head.parameters()) == 512 * 32 + 32 + 32 * 6 + 6


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="num_classes"):
        HeadReplacer(0)
    with pytest.raises(ValueError, match="dropout"):
        HeadReplacer(3, dropout=1.5)


# -- the head shapes timm has: lists of heads, heads owning their pooling, auxiliary and
# distillation heads, wrapped heads whose pretrained layers are kept (or reset)


def meta_model(name: str, **kwargs) -> nn.Module:
    with torch.device("meta"):
        return timm.create_model(name, pretrained=False, **kwargs)


def meta_logits(model: nn.Module) -> tuple[int, ...]:
    x = torch.empty(2, *model.pretrained_cfg["input_size"], device="meta")
    return tuple(model.eval()(x).shape)


@pytest.mark.parametrize("name", [
    "crossvit_tiny_240",       # head is a ModuleList, one Linear per branch
    "sequencer2d_s",           # head is a ClassifierHead (owns its pooling)
    "volo_d1_224",             # aux_head, a second 1000-way classifier
    "deit_tiny_distilled_patch16_224",  # head and head_dist
    "levit_128s",              # NormLinear (BN + Linear), distilled
    "repvit_m1",               # RepVitClassifier with a distillation head reset_classifier drops
])
def test_every_classifier_resized_and_forward_gives_num_classes(name):
    model = meta_model(name)
    HeadReplacer(num_classes=7).apply(model)
    assert meta_logits(model) == (2, 7)
    assert model.num_classes == 7 and head_width(model) == 7
    # no layer inside the model still produces the 1000 ImageNet classes
    assert not [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.out_features == 1000]


def test_head_that_owns_pooling_keeps_pre_logits():
    model = meta_model("sequencer2d_s")
    HeadReplacer(num_classes=5).apply(model)
    feats = model.forward_features(torch.empty(2, 3, 224, 224, device="meta"))
    assert tuple(model.forward_head(feats, pre_logits=True).shape) == (2, model.num_features)
    assert tuple(model.forward_head(feats).shape) == (2, 5)


def test_aux_head_is_part_of_the_head_group():
    model = meta_model("volo_d1_224")
    HeadReplacer(num_classes=3).apply(model)
    groups = parameter_groups(model)
    assert {"aux_head.weight", "aux_head.bias", "head.weight", "head.bias"} <= set(groups[-1].param_names)
    assert not any(n.startswith("aux_head") for g in groups[:-1] for n in g.param_names)
    # freeze_to(-2) trains the last real stage and the heads, never aux_head as a "stage"
    trainable = FreezePolicy.freeze_to(-2).trainable_names(model)
    assert {n for n in trainable if n.startswith("post_network.1.")}


def test_keep_preserves_pretrained_norm_of_wrapped_head_and_reset_reinitialises_it():
    torch.manual_seed(0)
    model = timm.create_model("levit_128s", pretrained=False)
    with torch.no_grad():
        model.head.bn.weight.fill_(3.0)  # stands for a pretrained value
    kept = HeadReplacer(num_classes=4).apply(model)
    assert isinstance(kept.head.linear, nn.Linear) and kept.head.linear.out_features == 4
    assert torch.all(kept.head.bn.weight == 3.0)

    other = timm.create_model("levit_128s", pretrained=False)
    with torch.no_grad():
        other.head.bn.weight.fill_(3.0)
    reset = HeadReplacer(num_classes=4, head_layers="reset").apply(other)
    assert torch.all(reset.head.bn.weight == 1.0)  # timm's fresh BatchNorm
    assert reset(torch.randn(2, 3, 224, 224)).shape == (2, 4)


def test_metaformer_mlp_head_keeps_fc1_and_norm():
    torch.manual_seed(0)
    model = timm.create_model("caformer_s18", pretrained=False, num_classes=10)
    fc1 = model.head.fc.fc1.weight.detach().clone()
    HeadReplacer(num_classes=4).apply(model)
    assert torch.equal(model.head.fc.fc1.weight, fc1)
    assert model.head.fc.fc2.out_features == 4
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 4)


def test_dropout_head_on_every_branch_of_a_list_head():
    model = meta_model("crossvit_tiny_240")
    HeadReplacer(num_classes=6, dropout=0.2).apply(model)
    assert [type(h).__name__ for h in model.head] == ["TaskHead", "TaskHead"]
    assert meta_logits(model) == (2, 6)


def test_unhandled_classifier_is_an_error_at_replacement_naming_model_and_module():
    class Odd(nn.Module):
        num_classes = 1000

        def __init__(self):
            super().__init__()
            self.body = nn.Conv2d(3, 8, 3)
            self.head = nn.Conv2d(8, 1000, 3)

        def get_classifier(self):
            return self.head

        def reset_classifier(self, n):
            self.head = nn.Conv2d(8, n, 3)

    with pytest.raises(ValueError, match=r"Odd: classifier 'head' is a \(3, 3\) convolution"):
        HeadReplacer(num_classes=2).apply(Odd())


def test_finetuner_checks_head_width_and_class_count():
    model = timm.create_model("test_resnet", pretrained=False)  # 1000-way head never replaced
    with pytest.raises(ValueError, match=r"1000 outputs but 2 class names.*HeadReplacer\(num_classes=2\)"):
        FineTuner(model, ["a", "b"], config=None)
    with pytest.raises(ValueError, match="at least 2 classes"):
        FineTuner(HeadReplacer(1).apply(timm.create_model("test_resnet", pretrained=False)), ["only"])
    with pytest.raises(ValueError, match="different widths"):
        m = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False)
        m.head = nn.Linear(m.head.in_features, 3)  # head_dist left at 1000
        check_head_width(m, ["a", "b", "c"])


def test_loaded_model_keeps_data_config_when_wrapped_again():
    model = HeadReplacer(2).apply(timm.create_model("test_resnet", pretrained=False))
    custom = {"input_size": [3, 96, 64], "interpolation": "bilinear", "mean": [0.5] * 3, "std": [0.5] * 3,
              "crop_pct": 1.0, "crop_mode": "squash"}
    FineTuner(model, ["a", "b"], data_config=custom)
    assert FineTuner(model, ["a", "b"]).data_config == custom


@pytest.mark.parametrize("name", ["resnet18", "deit_tiny_distilled_patch16_224", "crossvit_tiny_240", "levit_128s"])
def test_finding_the_head_on_the_meta_twin_leaves_the_model_as_it_was(name):
    # reset_classifier runs on a structural twin (modules copied, tensors on meta): the model's
    # modules, tensors and values must be untouched, tied tensors stay tied in the twin.
    from tlkit.head import _meta_twin, _reset_targets

    model = timm.create_model(name, pretrained=False)
    before_modules = {n: type(m) for n, m in model.named_modules()}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = {k: id(v) for k, v in model.named_parameters()}
    targets = _reset_targets(model, 7)
    assert targets and all(width > 0 for _, width in targets)
    assert {n: type(m) for n, m in model.named_modules()} == before_modules
    assert {k: id(v) for k, v in model.named_parameters()} == ids
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    lin = nn.Linear(3, 3)
    tied = nn.Sequential(lin, nn.Sequential(lin))
    twin = _meta_twin(tied)
    assert twin[0].weight.is_meta and twin[0].weight is twin[1][0].weight and twin[0] is twin[1][0]
