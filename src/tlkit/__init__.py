"""tlkit: transfer learning on any timm backbone.

    from tlkit import FreezePolicy, HeadReplacer, FineTuner
"""

from tlkit._version import __version__

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the eager imports, for type checkers and IDEs
    from tlkit.backbone import create_backbone, load_weights, read_state_dict, resolve_backbone, resolve_data_config
    from tlkit.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
    from tlkit.config import (
        AugmentConfig,
        BackboneConfig,
        DataConfigOverrides,
        DatasetConfig,
        HeadConfig,
        RunConfig,
        TrainConfig,
    )
    from tlkit.data import (
        ImageFolderDataset,
        create_transforms,
        eval_resize_size,
        load_datasets,
        skip_none_collate,
        stratified_kfold,
        stratified_split,
    )
    from tlkit.demo import build_demo, launch_demo
    from tlkit.distributed import DistributedContext, destroy_distributed, distributed_context, init_distributed
    from tlkit.features import FeatureCache, extract_features
    from tlkit.finetuner import FineTuner, Prediction
    from tlkit.freeze import FreezePolicy, ParamGroup, Phase, parameter_groups
    from tlkit.schedule import cosine_lr_factor
    from tlkit.head import HeadReplacer, TaskHead
    from tlkit.images import (
        IMAGE_EXTENSIONS,
        MAX_BYTES,
        MAX_PIXELS,
        BadImage,
        BadImageError,
        ScanReport,
        SkippedImageWarning,
        find_bad_images,
        load_image,
        to_rgb,
    )
    from tlkit.lr_finder import LRFinderResult
    from tlkit.metrics import ClassificationMetrics
    from tlkit.protocol import ProtocolResult, cross_validate, repeat_seeds
    from tlkit.recipes import RECIPES, apply_recipe
    from tlkit.report import write_run_report
    from tlkit.tta import TTA_MODES, check_tta_mode, tta_log_probs, tta_views

_EXPORTS = {  # public name -> module; imported on first use (PEP 562), so `tlkit --help` needs no torch
    "apply_recipe": "tlkit.recipes",
    "AugmentConfig": "tlkit.config",
    "BackboneConfig": "tlkit.config",
    "BadImage": "tlkit.images",
    "BadImageError": "tlkit.images",
    "build_demo": "tlkit.demo",
    "check_tta_mode": "tlkit.tta",
    "CheckpointError": "tlkit.checkpoint",
    "ClassificationMetrics": "tlkit.metrics",
    "cosine_lr_factor": "tlkit.schedule",
    "create_backbone": "tlkit.backbone",
    "create_transforms": "tlkit.data",
    "cross_validate": "tlkit.protocol",
    "DataConfigOverrides": "tlkit.config",
    "DatasetConfig": "tlkit.config",
    "destroy_distributed": "tlkit.distributed",
    "distributed_context": "tlkit.distributed",
    "DistributedContext": "tlkit.distributed",
    "eval_resize_size": "tlkit.data",
    "extract_features": "tlkit.features",
    "FeatureCache": "tlkit.features",
    "find_bad_images": "tlkit.images",
    "FineTuner": "tlkit.finetuner",
    "FreezePolicy": "tlkit.freeze",
    "HeadConfig": "tlkit.config",
    "HeadReplacer": "tlkit.head",
    "IMAGE_EXTENSIONS": "tlkit.images",
    "ImageFolderDataset": "tlkit.data",
    "init_distributed": "tlkit.distributed",
    "launch_demo": "tlkit.demo",
    "load_checkpoint": "tlkit.checkpoint",
    "load_datasets": "tlkit.data",
    "load_image": "tlkit.images",
    "load_weights": "tlkit.backbone",
    "LRFinderResult": "tlkit.lr_finder",
    "MAX_BYTES": "tlkit.images",
    "MAX_PIXELS": "tlkit.images",
    "parameter_groups": "tlkit.freeze",
    "ParamGroup": "tlkit.freeze",
    "Phase": "tlkit.freeze",
    "Prediction": "tlkit.finetuner",
    "ProtocolResult": "tlkit.protocol",
    "read_state_dict": "tlkit.backbone",
    "RECIPES": "tlkit.recipes",
    "repeat_seeds": "tlkit.protocol",
    "resolve_backbone": "tlkit.backbone",
    "resolve_data_config": "tlkit.backbone",
    "RunConfig": "tlkit.config",
    "save_checkpoint": "tlkit.checkpoint",
    "ScanReport": "tlkit.images",
    "skip_none_collate": "tlkit.data",
    "SkippedImageWarning": "tlkit.images",
    "stratified_kfold": "tlkit.data",
    "stratified_split": "tlkit.data",
    "TaskHead": "tlkit.head",
    "to_rgb": "tlkit.images",
    "TrainConfig": "tlkit.config",
    "tta_log_probs": "tlkit.tta",
    "TTA_MODES": "tlkit.tta",
    "tta_views": "tlkit.tta",
    "write_run_report": "tlkit.report",
}

__all__ = [
    "__version__",
    "AugmentConfig",
    "BackboneConfig",
    "BadImage",
    "BadImageError",
    "CheckpointError",
    "ClassificationMetrics",
    "DataConfigOverrides",
    "DatasetConfig",
    "DistributedContext",
    "FeatureCache",
    "FineTuner",
    "FreezePolicy",
    "HeadConfig",
    "HeadReplacer",
    "IMAGE_EXTENSIONS",
    "LRFinderResult",
    "ImageFolderDataset",
    "MAX_BYTES",
    "MAX_PIXELS",
    "ParamGroup",
    "Phase",
    "Prediction",
    "ProtocolResult",
    "RECIPES",
    "RunConfig",
    "ScanReport",
    "SkippedImageWarning",
    "TTA_MODES",
    "TaskHead",
    "TrainConfig",
    "apply_recipe",
    "build_demo",
    "check_tta_mode",
    "cosine_lr_factor",
    "create_backbone",
    "create_transforms",
    "cross_validate",
    "destroy_distributed",
    "distributed_context",
    "eval_resize_size",
    "extract_features",
    "find_bad_images",
    "init_distributed",
    "launch_demo",
    "load_checkpoint",
    "load_datasets",
    "load_image",
    "load_weights",
    "parameter_groups",
    "read_state_dict",
    "repeat_seeds",
    "resolve_backbone",
    "resolve_data_config",
    "save_checkpoint",
    "skip_none_collate",
    "stratified_kfold",
    "stratified_split",
    "to_rgb",
    "tta_log_probs",
    "tta_views",
    "write_run_report",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'tlkit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
