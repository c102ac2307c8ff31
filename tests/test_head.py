import pytest
import timm
import torch
from torch import nn

from tlkit import FreezePolicy, HeadReplacer, TaskHead
from tlkit.head import classifier_param_names

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
