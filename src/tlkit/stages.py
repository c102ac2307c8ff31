"""Stages: a model's parameters split into ordered groups, input side first, the classifier last.

One meaning of "depth" for every timm family: the stages come from timm's own
``group_matcher(coarse=True)`` (via ``timm.models.group_parameters``), else from ``feature_info``,
else from the top-level children; the classifier is split off as a final ``head`` group.
`tlkit.freeze.FreezePolicy` freezes and scales learning rates by these stages.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tlkit._introspect import classifier_param_names

__all__ = ["ParamGroup", "parameter_groups"]


@dataclass(frozen=True)
class ParamGroup:
    """One stage of a model: a name and its parameter names, in model order."""

    name: str
    param_names: tuple[str, ...]


def _prefix_counts(names: list[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for n in names:
        parts = n.split(".")
        for k in range(1, len(parts)):
            key = ".".join(parts[:k])
            counts[key] = counts.get(key, 0) + 1
    return counts


def _group_label(names: list[str], all_counts: dict[str, int]) -> str:
    # Each parameter's owner: the shortest module prefix whose parameters all lie in this group
    # ("layer1" rather than "layer1.0"; a bare parameter such as "cls_token" owns itself).
    # Owners joined by "+" ("conv1+bn1", "blocks.6+conv_head+bn2"); more than three: "a..b".
    mine = _prefix_counts(names)
    owners: list[str] = []
    for n in names:
        parts = n.split(".")
        owner = next((".".join(parts[:k]) for k in range(1, len(parts))
                      if mine[".".join(parts[:k])] == all_counts[".".join(parts[:k])]), n)
        owners.append(owner)
    owners = list(dict.fromkeys(owners))  # in first-seen order
    return "+".join(owners) if len(owners) <= 3 else f"{owners[0]}..{owners[-1]}"


def _matcher_groups(model: nn.Module) -> list[list[str]]:
    # timm's stage-level grouping; some families raise (RDNet asserts coarse=False) or have none.
    matcher = getattr(model, "group_matcher", None)
    if not callable(matcher):
        return []
    from timm.models import group_parameters

    try:
        grouped = group_parameters(model, matcher(coarse=True))
    except Exception:  # noqa: BLE001 - any failure of a model's matcher means: use the fallbacks
        return []
    return [list(v) for _, v in sorted(grouped.items())]


def _feature_info_groups(model: nn.Module, all_names: list[str]) -> list[list[str]]:
    # The stages timm itself reports for features_only: each feature_info module ends a stage;
    # parameters before the first are the stem, those after the last join it.
    info = getattr(model, "feature_info", None)
    modules = [i.get("module") for i in info] if isinstance(info, list) and info and isinstance(info[0], dict) else []
    if not modules or not all(isinstance(m, str) and m for m in modules):
        return []
    order = [n.removesuffix(".") for n in modules]
    groups: list[list[str]] = [[] for _ in range(len(order) + 1)]
    stage = 0
    for n in all_names:
        hit = [i for i, m in enumerate(order) if n.startswith(m + ".")]
        if hit:
            stage = hit[0] + 1
        groups[stage].append(n)
    return [g for g in groups if g]


def _child_groups(model: nn.Module, all_names: list[str]) -> list[list[str]]:
    # One group per top-level child; a top-level list of blocks ("stages", "blocks", "layers")
    # gives one group per item, so stage freezing still means something.
    by_key: dict[str, list[str]] = {}
    for n in all_names:
        parts = n.split(".")
        key = ".".join(parts[:2]) if len(parts) > 2 and parts[1].isdigit() else parts[0]
        by_key.setdefault(key, []).append(n)
    return list(by_key.values())


def _merge_norm_only(raw: list[list[str]], params: dict[str, torch.Tensor]) -> list[list[str]]:
    # A group of 1-d parameters only (a trailing norm, a lone scale) is not a stage: it joins the
    # stage before it (the first one: the stage after it), so depth counts real stages.
    out: list[list[str]] = []
    pending: list[str] = []
    for names in raw:
        if all(params[n].ndim <= 1 for n in names):
            if out:
                out[-1] = out[-1] + names
            else:
                pending += names
            continue
        out.append(pending + names)
        pending = []
    if pending:
        out.append(pending)
    return out


def parameter_groups(model: nn.Module) -> list[ParamGroup]:
    """Split a model's parameters into ordered stages, input side first, ``head`` last.

    Stages come from the model's ``group_matcher(coarse=True)`` (timm's stage-level grouping);
    where a family has none or it fails (RDNet), from ``feature_info`` (the stages timm reports
    for ``features_only``), else one group per top-level child (a top-level block list gives one
    group per block). A group of 1-d parameters only (a trailing norm timm's matcher leaves
    unmatched) joins the stage before it. The classifier (`classifier_module_names`) always
    forms the final group named ``"head"``; a group emptied by that split is dropped.

    Args:
        model: a timm model (any ``nn.Module`` works through the fallbacks).

    Returns:
        Groups in forward order; every parameter appears in exactly one group.
    """
    params = dict(model.named_parameters())
    all_names = list(params)
    head = set(classifier_param_names(model))
    body_names = [n for n in all_names if n not in head]
    raw = _matcher_groups(model) or _feature_info_groups(model, body_names) or _child_groups(model, body_names)
    order = {n: i for i, n in enumerate(all_names)}
    raw = [sorted((n for n in names if n not in head), key=order.__getitem__) for names in raw]
    raw = _merge_norm_only([r for r in raw if r], params)
    groups = []
    used = {"head"}
    counts = _prefix_counts(all_names)
    for body in raw:
        label = _group_label(body, counts)
        if label in used:
            label = f"{label}#{len(groups)}"
        used.add(label)
        groups.append(ParamGroup(label, tuple(body)))
    if head:
        groups.append(ParamGroup("head", tuple(n for n in all_names if n in head)))
    return groups
