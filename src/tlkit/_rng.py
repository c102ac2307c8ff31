"""Random state: seed, save and restore torch, Python and NumPy generators in one place."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

__all__ = ["rng_state", "set_rng_state", "seed_everything", "seeded"]


def rng_state() -> dict[str, Any]:
    """The torch, Python, NumPy (and CUDA) generator states, as tensors/lists ``torch.load(weights_only=True)`` reads."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` returned (lists may come back where tuples went in)."""
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), *n[2:]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators with ``seed``."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def seeded(seed: int) -> Callable[[], contextlib.AbstractContextManager]:
    """A context-manager factory: run a block under ``seed_everything(seed)``, then restore every generator.

    Used where initialisation must not depend on what ran before (a new head in `FineTuner.load`
    and `FineTuner.from_config`, augmented feature views) and must not disturb the caller's RNG.
    """

    @contextlib.contextmanager
    def ctx() -> Iterator[None]:
        saved = rng_state()
        seed_everything(seed)
        try:
            yield
        finally:
            set_rng_state(saved)

    return ctx
