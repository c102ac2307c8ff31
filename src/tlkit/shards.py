"""Training data larger than one disk: sharded tar streams in the WebDataset format.

A shard is a plain ``.tar`` of samples, each two members with one key: ``<key>.<ext>`` (the image
file's own bytes: ``jpg``, ``png``...) and ``<key>.cls`` (the class index as text, or several
indices joined by ``,`` for a multi-label set), the layout the ``webdataset`` package and timm's
``wds`` reader read. `write_shards` makes them from an image folder or a label table (one
``shards.json`` beside them lists the classes and each shard's sample count); `ShardDataset`
streams them back.

Each epoch the shard list is shuffled (seed + epoch, the same on every process) and dealt
out: shard ``i`` of the shuffled list goes to process ``i % world_size`` and, inside it, to
DataLoader worker ``(i // world_size) % num_workers``; each worker shuffles its samples in a
buffer (``shuffle_buffer``). Every sample is read exactly once per epoch across all ranks and
workers (tested with 2 gloo processes x 2 workers). Processes then see different numbers of
samples when the shards are uneven: `ShardDataset.__len__` is this process's count, and
`FineTuner.fit` needs every process to take the same number of steps, so write shards of equal
size (``write_shards`` does, but for the last) and use a shard count that ``world_size``
divides. A run resumes at epoch boundaries (the loop's unit), not inside an epoch.
"""

from __future__ import annotations

import io
import json
import math
import random
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from PIL import Image

__all__ = ["ShardDataset", "write_shards"]

INDEX = "shards.json"


def write_shards(data: Any, out: str | Path, samples_per_shard: int = 1000, seed: int = 0) -> list[Path]:
    """Write ``data`` (an `ImageFolderDataset` or `LabelTableDataset`) as tar shards in ``out``.

    Samples are shuffled once (``seed``) so that every shard holds every class; each image's
    file bytes are stored as they are (no re-encoding). ``out/shards.json`` records the classes,
    whether the set is multi-label, and each shard's name and sample count.

    Returns:
        The shard paths, ``out/shard-000000.tar``...

    Raises:
        ValueError: ``samples_per_shard`` < 1, or ``out`` already holds shards.
    """
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be at least 1, got {samples_per_shard}")
    out = Path(out)
    if (out / INDEX).exists():
        raise ValueError(f"{out}: already holds shards ({INDEX}); write to an empty folder")
    out.mkdir(parents=True, exist_ok=True)
    order = list(range(len(data.samples)))
    random.Random(seed).shuffle(order)
    multilabel = bool(getattr(data, "multilabel", False))
    shards, counts = [], []
    for s in range(math.ceil(len(order) / samples_per_shard)):
        path = out / f"shard-{s:06d}.tar"
        chunk = order[s * samples_per_shard:(s + 1) * samples_per_shard]
        with tarfile.open(path, "w") as tar:
            for i in chunk:
                file, label = data.samples[i]
                key = f"{i:09d}"
                _add(tar, f"{key}{Path(file).suffix.lower()}", Path(file).read_bytes())
                text = ",".join(map(str, label)) if multilabel else str(label)
                _add(tar, f"{key}.cls", text.encode())
        shards.append(path)
        counts.append(len(chunk))
    index = {"classes": list(data.classes), "multilabel": multilabel,
             "shards": [{"name": p.name, "samples": n} for p, n in zip(shards, counts)]}
    (out / INDEX).write_text(json.dumps(index, indent=1))
    return shards


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(payload))


class ShardDataset(torch.utils.data.IterableDataset):
    """Stream the samples of tar shards written by `write_shards` (see the module docstring).

    Items are ``(image, label)`` as for `ImageFolderDataset`: the transform applied to a PIL RGB
    image (decoded by `tlkit.load_image` rules: size limits, EXIF, any mode to RGB), and the class
    index (a float multi-hot tensor for a multi-label set).

    Args:
        folder: the folder with ``shards.json`` and the shards.
        transform: applied to each PIL image.
        shuffle: shuffle the shards and, in a buffer, the samples, anew each epoch (training);
            ``False`` reads them in order (evaluation).
        seed: the shuffle's seed (``seed + epoch``).
        shuffle_buffer: samples each worker holds to shuffle among.
        rank: this process's rank; default the torchrun process group's.
        world_size: the process count; default the torchrun process group's.

    Raises:
        FileNotFoundError: no ``shards.json`` in ``folder``.
    """

    def __init__(self, folder: str | Path, transform: Any = None, *, shuffle: bool = True, seed: int = 0,
                 shuffle_buffer: int = 256, rank: int | None = None, world_size: int | None = None) -> None:
        self.folder = Path(folder)
        index_file = self.folder / INDEX
        if not index_file.is_file():
            raise FileNotFoundError(f"{self.folder}: no {INDEX}; write shards with tlkit.shards.write_shards")
        index = json.loads(index_file.read_text())
        self.classes: list[str] = index["classes"]
        self.multilabel: bool = index.get("multilabel", False)
        self.shards: list[dict] = index["shards"]
        self.transform, self.shuffle, self.seed, self.shuffle_buffer = transform, shuffle, seed, shuffle_buffer
        if rank is None or world_size is None:
            from tlkit.distributed import distributed_context

            ctx = distributed_context()
            rank, world_size = (ctx.rank, ctx.world_size) if ctx is not None else (0, 1)
        self.rank, self.world_size, self.epoch = rank, world_size, 0

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose shuffle `__iter__` uses (the loop sets it before each epoch)."""
        self.epoch = epoch

    def with_transform(self, transform: Any, draft_size: int | None = None) -> ShardDataset:
        """A copy with another transform (as `ImageFolderDataset.with_transform`)."""
        import copy

        out = copy.copy(self)
        out.transform = transform
        return out

    def _order(self) -> list[int]:
        order = list(range(len(self.shards)))
        if self.shuffle:
            random.Random(self.seed + self.epoch).shuffle(order)
        return order

    def my_shards(self, worker: int = 0, workers: int = 1) -> list[int]:
        """The shard indices this process's ``worker`` of ``workers`` reads this epoch."""
        mine = self._order()[self.rank::self.world_size]
        return mine[worker::workers]

    def __len__(self) -> int:
        """Samples this process reads in one epoch (its shards' counts)."""
        return sum(self.shards[i]["samples"] for i in self._order()[self.rank::self.world_size])

    def _samples(self, shard: dict) -> Iterator[tuple[bytes, str, str]]:
        pending: dict[str, dict[str, bytes]] = {}
        with tarfile.open(self.folder / shard["name"]) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, _, ext = member.name.rpartition(".")
                entry = pending.setdefault(key, {})
                entry[ext] = tar.extractfile(member).read()
                if "cls" in entry and len(entry) == 2:
                    image_ext = next(e for e in entry if e != "cls")
                    yield entry[image_ext], image_ext, entry["cls"].decode()
                    del pending[key]

    def _decode(self, payload: bytes, ext: str, label: str):
        from PIL import ImageOps

        from tlkit.images import DECODERS, MAX_PIXELS, BadImageError, to_rgb

        # A shard may come from anyone: the same decoder allow-list and pixel limit as image files.
        with Image.open(io.BytesIO(payload), formats=DECODERS) as im:
            if im.width * im.height > MAX_PIXELS:
                raise BadImageError(f"{self.folder}: a .{ext} sample claims {im.width}x{im.height} pixels")
            im.load()
            image = to_rgb(ImageOps.exif_transpose(im))
        x = self.transform(image) if self.transform else image
        if self.multilabel:
            target = torch.zeros(len(self.classes))
            target[[int(v) for v in label.split(",") if v]] = 1.0
            return x, target
        return x, int(label)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        rng = random.Random(f"{self.seed}-{self.epoch}-{self.rank}-{worker}")
        buffer: list[tuple[bytes, str, str]] = []
        for s in self.my_shards(worker, workers):
            for sample in self._samples(self.shards[s]):
                if not self.shuffle:
                    yield self._decode(*sample)
                    continue
                buffer.append(sample)
                if len(buffer) >= self.shuffle_buffer:
                    yield self._decode(*buffer.pop(rng.randrange(len(buffer))))
        rng.shuffle(buffer)
        for sample in buffer:
            yield self._decode(*sample)
