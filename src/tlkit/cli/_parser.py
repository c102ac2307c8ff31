"""The ``tlkit`` argument parser: every command, its options and help."""

from __future__ import annotations

import argparse
from pathlib import Path

from tlkit.cli._args import CALIBRATION_IMAGES, _count, _device_arg, _parse_override
from tlkit.cli._export import _cmd_export
from tlkit.cli._machine import _cmd_backbones, _cmd_env, _cmd_shards
from tlkit.cli._train import _cmd_config, _cmd_lr_find, _cmd_rank, _cmd_train
from tlkit.cli._use import _cmd_demo, _cmd_evaluate, _cmd_predict, _cmd_soup
from tlkit.images import MAX_BYTES, MAX_PIXELS


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``tlkit export: error: ... (see tlkit export --help)``, exit 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``tlkit`` command."""
    from tlkit._version import __version__

    parser = _Parser(prog="tlkit", description="Transfer learning on any timm backbone.")
    parser.add_argument("--version", action="version", version=f"tlkit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    _add_run_commands(sub)  # the order of `tlkit --help`
    _add_machine_commands(sub)
    _add_checkpoint_commands(sub)
    _add_export_command(sub)
    _add_model_commands(sub)
    return parser


def _add_run_commands(sub: argparse._SubParsersAction) -> None:
    """Commands that read a RunConfig or data folder: train, config, lr-find, rank."""
    p = sub.add_parser("train", help="train from a YAML/JSON RunConfig (also under torchrun: DDP, batch_size per process)")
    p.add_argument("--config", type=Path, help="RunConfig file (.yaml, .yml or .json)")
    p.add_argument("--set", type=_parse_override, action="append", metavar="KEY=VALUE",
                   help="override a config field, e.g. --set train.epochs=5 --set data.root=photos")
    p.add_argument("--recipe", help="apply a named recipe (auto, linear-probe, finetune, finetune-strong, lp-ft, scratch) to the config; --set values win")
    p.add_argument("--resume", action="store_true", help="continue from output_dir/last.state.pt")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in output_dir (without it, or --resume, such a folder is refused)")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("config", help="print the resolved RunConfig as YAML (--template: every field, commented)")
    p.add_argument("--config", type=Path, help="RunConfig file (.yaml, .yml or .json); default: the defaults")
    p.add_argument("--recipe", help="apply a named recipe first")
    p.add_argument("--set", type=_parse_override, action="append", metavar="KEY=VALUE")
    p.add_argument("--template", action="store_true", help="each field's description as a comment above it")
    p.set_defaults(func=_cmd_config)

    p = sub.add_parser("lr-find", help="learning-rate range test on a RunConfig's training data")
    p.add_argument("--config", type=Path, help="RunConfig file (.yaml, .yml or .json)")
    p.add_argument("--recipe", help="apply a named recipe first")
    p.add_argument("--set", type=_parse_override, action="append", metavar="KEY=VALUE")
    p.add_argument("--start-lr", type=float, default=1e-7)
    p.add_argument("--end-lr", type=float, default=10.0)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--epoch", type=int, default=0, help="which phase of the freeze policy to test")
    p.add_argument("--plot", type=Path, help="save the loss-against-LR plot here (PNG)")
    p.set_defaults(func=_cmd_lr_find)

    p = sub.add_parser("rank", help="rank backbones for a dataset from frozen features (LogME, linear-probe top-1)")
    p.add_argument("--data", required=True, type=Path, help="folder with one sub-folder per class")
    p.add_argument("--backbone", action="append", metavar="NAME[=WEIGHTS]",
                   help="a timm name, with a local weights file after '=' (else hub weights); repeat it")
    p.add_argument("--backbones", type=Path, help="YAML/JSON list of backbone configs (name, weights, model_kwargs, data_config)")
    p.add_argument("--batch-size", type=int, default=16, help="images per forward pass (default 16)")
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int, default=1,
                   help="loader processes that decode the images once for every backbone (default 1; 0: none)")
    p.add_argument("--format", choices=["table", "json"], default="table")
    p.set_defaults(func=_cmd_rank)


def _add_machine_commands(sub: argparse._SubParsersAction) -> None:
    """Commands about this machine and data on disk: shards, env, backbones."""
    p = sub.add_parser("shards", help="write an image folder or a label table as WebDataset tar shards")
    p.add_argument("--data", type=Path, help="folder with one sub-folder per class")
    p.add_argument("--labels", type=Path, help="a label table (CSV/TSV) instead")
    p.add_argument("--output", required=True, type=Path, help="an empty folder for the shards and shards.json")
    p.add_argument("--samples-per-shard", type=_count(1), default=1000, help="samples in each shard (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="the shuffle that spreads every class over the shards")
    p.set_defaults(func=_cmd_shards)

    p = sub.add_parser("env", help="versions, the CPU's features (AVX2, AVX512, BF16, VNNI, AMX), GPUs, and the path "
                                   "tlkit picks on this machine")
    p.add_argument("--format", choices=["text", "json"], default="text")
    p.set_defaults(func=_cmd_env)

    p = sub.add_parser("backbones", help="list timm model names, and where weights are available offline")
    p.add_argument("pattern", nargs="?", help="wildcard filter, e.g. 'mobilenet*'")
    p.add_argument("--pretrained", action="store_true", help="only names with pretrained weights (name.tag)")
    p.add_argument("--offline", action="store_true", help="only models whose weights load without network")
    p.set_defaults(func=_cmd_backbones)


def _add_checkpoint_commands(sub: argparse._SubParsersAction) -> None:
    """Commands that read a checkpoint and images: evaluate, predict."""
    p = sub.add_parser("evaluate", help="evaluate a checkpoint on an image folder; prints one JSON object")
    p.add_argument("--checkpoint", required=True, help="a .safetensors checkpoint or a run folder (its best)")
    p.add_argument("--data", help="folder with one sub-folder per class (names as in the checkpoint)")
    p.add_argument("--split", choices=["val", "test"],
                   help="evaluate on the run's own validation split, or a label table's test rows (from its config.yaml)")
    p.add_argument("--tta", choices=["none", "hflip", "multi-crop"], default="none", help="test-time augmentation")
    p.add_argument("--report", type=Path, help="also write the per-class report (Markdown) here")
    p.add_argument("--batch-size", type=int, help="images per forward pass (default: 16 on CPU, 64 on GPU)")
    p.add_argument("--device", default="auto", type=_device_arg, help="auto (default), cpu, cuda, cuda:N or mps")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("predict", help="classify images; prints one JSON object per image")
    p.add_argument("--checkpoint", required=True, help="a .safetensors checkpoint or a run folder (its best)")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--batch-size", type=int, help="images per forward pass (default: 16 on CPU, 64 on GPU)")
    p.add_argument("--device", default="auto", type=_device_arg, help="auto (default), cpu, cuda, cuda:N or mps")
    p.add_argument("--max-pixels", type=int, default=MAX_PIXELS,
                   help=f"refuse images whose header claims more pixels (default {MAX_PIXELS})")
    p.add_argument("--max-bytes", type=int, default=MAX_BYTES,
                   help=f"refuse image files larger than this many bytes (default {MAX_BYTES})")
    p.add_argument("--format", choices=["table", "json", "csv"], default="json",
                   help="table: top-k per image; json: one object per line; csv: every class probability")
    p.add_argument("--top-k", type=int, default=3, help="classes shown per image in the table (default 3)")
    p.add_argument("--tta", choices=["none", "hflip", "multi-crop"], default="none",
                   help="test-time augmentation: average probabilities over flipped / cropped views")
    p.set_defaults(func=_cmd_predict)


def _add_model_commands(sub: argparse._SubParsersAction) -> None:
    """Commands that make or serve a model from checkpoints: soup, demo."""
    p = sub.add_parser("soup", help="average checkpoints of one recipe (other seeds or epochs) into one: a model soup")
    p.add_argument("--checkpoint", action="append", required=True, metavar="PATH",
                   help="a .safetensors checkpoint or a run folder; repeat it (at least two)")
    p.add_argument("--output", required=True, type=Path, help="the .safetensors file to write")
    p.add_argument("--greedy", type=Path, metavar="VAL_FOLDER",
                   help="a greedy soup: keep a checkpoint only if it does not lower top-1 (mAP) on these "
                        "validation photos, one folder per class (never the photos that judge the soup)")
    p.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    p.set_defaults(func=_cmd_soup)

    p = sub.add_parser("demo", help="serve a web page that classifies an uploaded photo (needs tlkit[demo])")
    p.add_argument("--checkpoint", required=True, help="a .safetensors checkpoint or a run folder (its best)")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on; 0.0.0.0 serves other machines (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="TCP port (default: the first free port from 7860)")
    p.add_argument("--top-k", type=int, default=3, help="classes shown with their probabilities (default 3)")
    p.add_argument("--examples", help="example photos under the upload: a folder or glob (at most 12), or none; "
                                      "default: one photo per class of the run's validation split")
    p.add_argument("--tta", choices=["none", "hflip", "multi-crop"], default="none",
                   help="test-time augmentation, as in predict")
    p.add_argument("--device", default="auto", type=_device_arg, help="auto (default), cpu, cuda, cuda:N or mps")
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link (needs network)")
    p.add_argument("--max-upload-mb", type=float, default=20.0,
                   help="refuse uploads larger than this many MiB (default 20); uploads are deleted once classified")
    p.set_defaults(func=_cmd_demo)


def _add_export_command(sub: argparse._SubParsersAction) -> None:
    """``tlkit export``: every deployment format and its checks."""
    p = sub.add_parser("export", help="export a checkpoint: ONNX (float32 or INT8), torch.export, TorchScript or a plain timm folder")
    p.add_argument("--checkpoint", required=True, help="a .safetensors checkpoint or a run folder (its best)")
    p.add_argument("--output", required=True, type=Path,
                   help="the file to write (.onnx, .pt2 or .pt), or the folder for --format timm")
    p.add_argument("--format", choices=["onnx", "onnx-int8", "torch-export", "torchscript", "timm"], default="onnx",
                   help="onnx-int8: statically quantised for the edge (calibrated on photos); torch-export: a "
                        ".pt2 ExportedProgram (dynamic batch); timm: a folder plain timm loads with "
                        "create_model('local-dir:PATH', pretrained=True)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --output if it exists (never the checkpoint or its run's files)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    p.add_argument("--check", type=Path,
                   help="image folder or file/glob: compare the export with PyTorch (onnx-int8: with the float32 "
                        "ONNX model: top-1 agreement, top-1 with class sub-folders, images/s, file size)")
    p.add_argument("--check-limit", type=_count(0), default=16,
                   help="photos of --check used, evenly spaced (default 16; 0: all)")
    p.add_argument("--calibration", type=Path,
                   help="onnx-int8: photos like the training ones (default: the run's training split, "
                        "read from the config.yaml beside the checkpoint)")
    p.add_argument("--calibration-images", type=_count(1), default=CALIBRATION_IMAGES,
                   help=f"onnx-int8: calibration photos used, evenly spaced (default {CALIBRATION_IMAGES})")
    p.add_argument("--calibration-method", choices=["minmax", "percentile", "entropy"], default="minmax",
                   help="onnx-int8: how activation ranges are set (onnxruntime CalibrationMethod; default minmax)")
    p.add_argument("--reduce-range", action="store_true",
                   help="onnx-int8: 7-bit weights, for x86 CPUs without VNNI (onnxruntime's saturation note)")
    p.set_defaults(func=_cmd_export)

