"""The commands about this machine: ``tlkit env``, ``shards`` and ``backbones``."""

from __future__ import annotations

import argparse
import json
import os
import sys

from tlkit._text import escape_control
from tlkit.cli._args import _offline_weights


def _environment() -> dict:
    """What this machine offers tlkit and what tlkit chooses on it (``tlkit env``)."""
    import platform

    import torch

    from tlkit._cpu import cpu_features, cpu_name
    from tlkit._runtime import resolve_device, resolve_precision
    from tlkit._version import __version__

    device = resolve_device("auto")
    amp = resolve_precision("auto", device)
    out = {"tlkit": __version__, "python": platform.python_version(), "torch": torch.__version__,
           "cpu": cpu_name(), "cpu_features": cpu_features(), "cores": os.cpu_count(),
           "torch_threads": torch.get_num_threads(), "mkldnn": torch.backends.mkldnn.is_available(),
           "cuda": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
           if torch.cuda.is_available() else [],
           "chosen": {"device": str(device), "precision": str(amp).removeprefix("torch.") if amp else "fp32",
                      "channels_last": "on for convolutional models", "threads": torch.get_num_threads()}}
    import timm

    out["timm"] = timm.__version__
    return out


def _cmd_env(args: argparse.Namespace) -> int:
    """Print the environment: versions, the CPU's features, GPUs, and the path tlkit picks here."""
    env = _environment()
    if args.format == "json":
        print(json.dumps(env))
        return 0
    feats = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in env["cpu_features"].items() if v is not None)
    print(f"tlkit {env['tlkit']} (torch {env['torch']}, timm {env['timm']}, Python {env['python']})")
    print(f"CPU: {env['cpu']}, {env['cores']} cores; {feats or 'features unknown'}")
    print(f"GPUs: {', '.join(env['cuda']) or 'none'}")
    c = env["chosen"]
    print(f"chosen: device {c['device']}, precision {c['precision']} (autocast; 'auto' picks bf16 only where the "
          f"CPU or GPU has it), channels_last {c['channels_last']}, {c['threads']} threads")
    return 0


def _cmd_shards(args: argparse.Namespace) -> int:
    """Write an image folder or a label table as WebDataset tar shards (`tlkit.shards.write_shards`)."""
    from tlkit.data import ImageFolderDataset
    from tlkit.shards import write_shards

    if (args.data is None) == (args.labels is None):
        raise ValueError("shards: give --data FOLDER (one sub-folder per class) or --labels TABLE, one of them")
    if args.labels is not None:
        from tlkit.table import LabelTableDataset

        data = LabelTableDataset(args.labels)
    else:
        data = ImageFolderDataset(args.data)
    report = data.scan()  # a bad file is reported and left out, never written into a shard
    if report.bad:
        print(escape_control(report.summary(), keep="\n"), file=sys.stderr)
    paths = write_shards(data, args.output, samples_per_shard=args.samples_per_shard, seed=args.seed)
    print(json.dumps({"shards": len(paths), "samples": len(data), "folder": str(args.output)}))
    return 0


def _cmd_backbones(args: argparse.Namespace) -> int:
    import timm

    names = timm.list_models(args.pattern or "*", pretrained=args.pretrained)
    if not names:
        import difflib

        close = difflib.get_close_matches(args.pattern, timm.list_models(pretrained=args.pretrained), n=5, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; patterns are globs, e.g. '*mobilenet*'"
        raise ValueError(f"no timm model matches {args.pattern!r}{hint}")
    shown = 0
    for name in names:
        offline = _offline_weights(name.split(".")[0]) if args.offline or args.pattern else ""
        if args.offline and not offline:
            continue
        shown += 1
        print(f"{name}\t{offline}" if offline else name)
    if not shown:
        print(f"tlkit backbones: none of the {len(names)} matching model(s) has weights on this machine "
              "(a weights file: BackboneConfig.weights / --set backbone.weights=FILE)", file=sys.stderr)
    return 0

