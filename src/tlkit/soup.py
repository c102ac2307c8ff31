"""Weight averaging: WiSE-FT interpolation and model soups.

A fine-tuned model forgets some of what made its pretrained features robust. Averaging weights
in the space where fine-tuning moved them gives some of it back at no inference cost:

* **WiSE-FT** (Wortsman et al., "Robust fine-tuning of zero-shot models", CVPR 2022):
  ``(1 - alpha) * anchor + alpha * fine_tuned``, the anchor being the model before fine-tuning.
  For a new task the anchor is the linear probe (frozen backbone, trained head): the weights at
  the end of the head-only phase. ``TrainConfig.wise_ft`` does it during `FineTuner.fit`: from
  the first unfreeze on, what is validated, checkpointed and kept is the interpolation.
* **Uniform soups** (Wortsman et al., "Model soups", ICML 2022): the mean of models fine-tuned
  from the same start (other seeds, other epochs). `uniform_soup`; ``tlkit soup`` on the command
  line averages checkpoints of the same architecture and classes.
* **Greedy soups** (same paper, its "greedy soup" recipe): the ingredients ranked by their own
  validation score, best first; each joins the soup only if the soup's validation score does
  not drop. `greedy_soup`; ``tlkit soup --greedy VAL_FOLDER``. Score it on validation photos,
  never on the photos that will judge the soup.

Floating-point tensors are averaged; integer ones (BatchNorm's ``num_batches_tracked``) are
taken from the last model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

__all__ = ["greedy_soup", "interpolate", "uniform_soup"]


def _check_same(states: Sequence[dict[str, torch.Tensor]]) -> None:
    names = list(states[0])
    for i, s in enumerate(states[1:], 1):
        if list(s) != names:
            raise ValueError(f"model {i} has other tensors than model 0: only models of one architecture average")
        bad = next((k for k in names if s[k].shape != states[0][k].shape), None)
        if bad is not None:
            raise ValueError(f"model {i}: tensor {bad!r} is {tuple(s[bad].shape)}, model 0's "
                             f"{tuple(states[0][bad].shape)}")


def interpolate(anchor: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """WiSE-FT: ``(1 - alpha) * anchor + alpha * tuned``, tensor by tensor.

    Args:
        anchor: the state before fine-tuning (e.g. the linear probe's).
        tuned: the fine-tuned state, same names and shapes.
        alpha: 0 gives ``anchor``, 1 gives ``tuned``.

    Returns:
        A new state dict on ``tuned``'s devices and dtypes.

    Raises:
        ValueError: the states differ in names or shapes, or ``alpha`` is outside [0, 1].
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    _check_same([anchor, tuned])
    out = {}
    for k, v in tuned.items():
        if v.is_floating_point():
            a = anchor[k].to(device=v.device, dtype=torch.float64)  # float64: a = b gives a, exactly
            out[k] = ((1 - alpha) * a + alpha * v.double()).to(v.dtype)
        else:
            out[k] = v.clone()
    return out


def uniform_soup(states: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The mean of ``states`` (a uniform model soup).

    Raises:
        ValueError: no state, or states that differ in names or shapes.
    """
    if not states:
        raise ValueError("a soup needs at least one model")
    _check_same(states)
    out = {}
    for k, v in states[-1].items():
        if v.is_floating_point():
            # float64: the mean of equal float32 tensors is that tensor, exactly
            out[k] = (torch.stack([s[k].to(v.device, torch.float64) for s in states]).mean(0)).to(v.dtype)
        else:
            out[k] = v.clone()
    return out


def greedy_soup(states: Sequence[dict[str, torch.Tensor]],
                score: Callable[[dict[str, torch.Tensor]], float]) -> tuple[dict[str, torch.Tensor], list[int]]:
    """A greedy model soup (Wortsman et al., ICML 2022, Recipe 2).

    Each state is scored alone; then, best first, a state joins the soup when the uniform soup
    with it scores at least as well as without it. The best single model is always in.

    Args:
        states: models fine-tuned from the same start (same names and shapes).
        score: a state's validation score, higher is better (top-1, mAP...); called
            ``2 * len(states) - 1`` times.

    Returns:
        The soup's state and the indices of ``states`` in it, in the order they joined.

    Raises:
        ValueError: no state, or states that differ in names or shapes.
    """
    if not states:
        raise ValueError("a soup needs at least one model")
    _check_same(states)
    own = [score(s) for s in states]
    order = sorted(range(len(states)), key=lambda i: -own[i])  # stable: ties keep the given order
    kept, best = [order[0]], own[order[0]]
    for i in order[1:]:
        trial = score(uniform_soup([states[j] for j in [*kept, i]]))
        if trial >= best:
            kept, best = [*kept, i], trial
    return uniform_soup([states[j] for j in kept]), kept
