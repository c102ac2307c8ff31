"""tlkit: transfer learning on any timm backbone.

    from tlkit import FreezePolicy, HeadReplacer, FineTuner
"""

import importlib
from typing import TYPE_CHECKING, Any

from tlkit._version import __version__

# One table: public name -> (module, kept at the root). The 24 kept names are `__all__`; the
# others still resolve from the root, with a DeprecationWarning naming their module (they leave
# the root in tlkit 0.3).
_EXPORTS: dict[str, tuple[str, bool]] = {
    "FineTuner": ("tlkit.finetuner", True),
    "FreezePolicy": ("tlkit.freeze", True),
    "HeadReplacer": ("tlkit.head", True),
    "Callback": ("tlkit.callbacks", True),
    "Prediction": ("tlkit.finetuner", True),
    "RunConfig": ("tlkit.config", True),
    "TrainConfig": ("tlkit.config", True),
    "BackboneConfig": ("tlkit.config", True),
    "HeadConfig": ("tlkit.config", True),
    "DatasetConfig": ("tlkit.config", True),
    "AugmentConfig": ("tlkit.config", True),
    "DataConfigOverrides": ("tlkit.config", True),
    "ImageFolderDataset": ("tlkit.data", True),
    "LabelTableDataset": ("tlkit.table", True),
    "load_datasets": ("tlkit.datasets", True),
    "stratified_split": ("tlkit.data", True),
    "create_backbone": ("tlkit.backbone", True),
    "resolve_backbone": ("tlkit.backbone", True),
    "resolve_data_config": ("tlkit.backbone", True),
    "apply_recipe": ("tlkit.recipes", True),
    "ClassificationMetrics": ("tlkit.metrics", True),
    "BadImageError": ("tlkit.images", True),
    "CheckpointError": ("tlkit.checkpoint", True),
    "load_image": ("tlkit.images", True),
    # Reachable from the root for one more release; import them from their module.
    "BadImage": ("tlkit.images", False),
    "build_demo": ("tlkit.demo", False),
    "check_tta_mode": ("tlkit.tta", False),
    "cosine_lr_factor": ("tlkit.schedule", False),
    "create_transforms": ("tlkit.data", False),
    "cross_validate": ("tlkit.protocol", False),
    "destroy_distributed": ("tlkit.distributed", False),
    "distributed_context": ("tlkit.distributed", False),
    "DistributedContext": ("tlkit.distributed", False),
    "eval_resize_size": ("tlkit.data", False),
    "extract_features": ("tlkit.features", False),
    "FeatureCache": ("tlkit.features", False),
    "find_bad_images": ("tlkit.images", False),
    "IMAGE_EXTENSIONS": ("tlkit.images", False),
    "init_distributed": ("tlkit.distributed", False),
    "launch_demo": ("tlkit.demo", False),
    "load_checkpoint": ("tlkit.checkpoint", False),
    "load_weights": ("tlkit.backbone", False),
    "LRFinderResult": ("tlkit.lr_finder", False),
    "MAX_BYTES": ("tlkit.images", False),
    "MAX_PIXELS": ("tlkit.images", False),
    "parameter_groups": ("tlkit.freeze", False),
    "ParamGroup": ("tlkit.freeze", False),
    "Phase": ("tlkit.freeze", False),
    "ProtocolResult": ("tlkit.protocol", False),
    "read_state_dict": ("tlkit.backbone", False),
    "RECIPES": ("tlkit.recipes", False),
    "repeat_seeds": ("tlkit.protocol", False),
    "save_checkpoint": ("tlkit.checkpoint", False),
    "ScanReport": ("tlkit.images", False),
    "skip_none_collate": ("tlkit.data", False),
    "SkippedImageWarning": ("tlkit.images", False),
    "stratified_kfold": ("tlkit.data", False),
    "TaskHead": ("tlkit.head", False),
    "to_rgb": ("tlkit.images", False),
    "tta_log_probs": ("tlkit.tta", False),
    "TTA_MODES": ("tlkit.tta", False),
    "tta_views": ("tlkit.tta", False),
    "write_run_report": ("tlkit.report", False),
}

if TYPE_CHECKING:  # the root's names, for type checkers and IDEs (tests/test_api.py keeps it equal to the table)
    from tlkit.backbone import create_backbone, resolve_backbone, resolve_data_config
    from tlkit.callbacks import Callback
    from tlkit.checkpoint import CheckpointError
    from tlkit.config import (
        AugmentConfig,
        BackboneConfig,
        DataConfigOverrides,
        DatasetConfig,
        HeadConfig,
        RunConfig,
        TrainConfig,
    )
    from tlkit.data import ImageFolderDataset, stratified_split
    from tlkit.datasets import load_datasets
    from tlkit.finetuner import FineTuner, Prediction
    from tlkit.freeze import FreezePolicy
    from tlkit.head import HeadReplacer
    from tlkit.images import BadImageError, load_image
    from tlkit.metrics import ClassificationMetrics
    from tlkit.recipes import apply_recipe
    from tlkit.table import LabelTableDataset

__all__ = ["__version__", *(name for name, (_, kept) in _EXPORTS.items() if kept)]


def __getattr__(name: str) -> Any:
    entry = _EXPORTS.get(name)
    if entry is None:
        raise AttributeError(f"module 'tlkit' has no attribute {name!r}")
    module, kept = entry
    if not kept:
        import warnings

        warnings.warn(f"tlkit.{name} moves out of the package root in tlkit 0.3: import it from {module}",
                      DeprecationWarning, stacklevel=2)
    value = getattr(importlib.import_module(module), name)
    if kept:
        globals()[name] = value  # later lookups skip __getattr__ (deprecated names warn every time)
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
