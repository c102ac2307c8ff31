"""tlkit: transfer learning on any timm backbone.

    from tlkit import FreezePolicy, HeadReplacer, FineTuner
"""

from tlkit._version import __version__

from tlkit.backbone import create_backbone, load_weights, read_state_dict, resolve_data_config
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
