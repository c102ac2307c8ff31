"""Shards against the image folder: images/s of one pass over the same photos, decoded and augmented as in training.

    python bench/bench_shards.py                       # ../shared/data/trashnet, 3 passes each
    python bench/bench_shards.py --workers 2 --repeats 5

The photos are written once as WebDataset tar shards (`tlkit.shards.write_shards`, into a
temporary folder), then read back through a DataLoader in the two ways a training epoch reads
them: `ImageFolderDataset` (one file per photo, shuffled by index) and `ShardDataset` (shards in
shuffled order, a shuffle buffer), both with timm's training transform at 224 px. Passes
alternate (folder, shards, folder, ...) so that drift of a shared machine hits both; the table
gives the median images/s and the ratio shards / folder. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def one_pass(dataset, workers: int, shuffle: bool) -> float:
    """Images/s of one pass of a DataLoader over ``dataset`` (batches of 32)."""
    import torch

    loader = torch.utils.data.DataLoader(dataset, batch_size=32, shuffle=shuffle, num_workers=workers)
    t0, n = time.perf_counter(), 0
    for x, _ in loader:
        n += len(x)
    return n / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> None:
    import timm.data

    from tlkit import ImageFolderDataset
    from tlkit.shards import ShardDataset, write_shards

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "trashnet")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--samples-per-shard", type=int, default=256)
    args = p.parse_args(argv)
    transform = timm.data.create_transform(224, is_training=True)
    folder = ImageFolderDataset(args.data).with_transform(transform)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        write_shards(folder, Path(tmp) / "shards", samples_per_shard=args.samples_per_shard)
        written = time.perf_counter() - t0
        shards = ShardDataset(Path(tmp) / "shards", transform, rank=0, world_size=1)
        rates: dict[str, list[float]] = {"folder": [], "shards": []}
        for epoch in range(args.repeats):
            rates["folder"].append(one_pass(folder, args.workers, shuffle=True))
            shards.set_epoch(epoch)
            rates["shards"].append(one_pass(shards, args.workers, shuffle=False))
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"{len(folder)} photos from {args.data}; shards written in {written:.1f} s; "
          f"{args.workers} DataLoader workers; timm training transform at 224")
    print("| source | images/s (median of %d) | all passes |" % args.repeats)
    print("|---|---|---|")
    for k, v in rates.items():
        print(f"| {k} | {med[k]:.1f} | {', '.join(f'{r:.1f}' for r in v)} |")
    print(f"\nshards / folder: {med['shards'] / med['folder']:.2f}x")


if __name__ == "__main__":
    main()
