"""One process of test_shards.py's exactly-once check (under torchrun, gloo): read one epoch of the
shards through a DataLoader with 2 workers and write which samples this rank saw."""

import hashlib
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from tlkit.shards import ShardDataset  # noqa: E402

folder, out, epoch = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
ds = ShardDataset(folder, transform=lambda im: hashlib.sha256(im.tobytes()).hexdigest(), rank=rank, world_size=world,
                  shuffle_buffer=4)
ds.set_epoch(epoch)
loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=2, collate_fn=lambda b: b)
seen = [digest for batch in loader for digest, _ in batch]
(out / f"rank{rank}.json").write_text(json.dumps({"seen": seen, "len": len(ds)}))
