"""Building models on the ``meta`` device fast: weight initialisation skipped (a leaf module).

Used where tlkit builds a model only for its structure: the weightless twin `tlkit.head`
runs ``reset_classifier`` on, and the model a checkpoint header describes (`tlkit._meta_check`).
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["MetaValuesSkipped"]

_T = torch.Tensor
# In-place value operations (weight initialisation): on a meta tensor they change no shape and no
# value (it has none), but torch runs them through its reference decompositions, which made them
# most of the time of building a model on meta (trunc_normal_'s clamp_ alone).
_VALUE_OPS = {_T.clamp_, _T.clamp_min_, _T.clamp_max_, _T.normal_, _T.uniform_, _T.erfinv_, _T.mul_, _T.add_,
              _T.sub_, _T.div_, _T.sqrt_, _T.zero_, _T.fill_, _T.copy_, _T.exponential_, _T.bernoulli_,
              _T.random_, _T.log_normal_, _T.geometric_, _T.cauchy_}
_init = torch.nn.init
# torch.nn.init's functions are torch functions themselves: a mode sees them, not the tensor
# methods they call inside.
_VALUE_OPS |= {getattr(_init, n) for n in ("normal_", "uniform_", "trunc_normal_", "constant_", "zeros_", "ones_",
                                           "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_", "xavier_normal_",
                                           "orthogonal_", "eye_", "dirac_", "sparse_") if hasattr(_init, n)}


class MetaValuesSkipped(TorchFunctionMode):
    """Within this mode, in-place value operations on ``meta`` tensors return at once (shapes are
    unchanged, and a meta tensor has no values); every other call runs as usual."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        tensor = args[0] if args else (kwargs or {}).get("tensor")
        if func in _VALUE_OPS and isinstance(tensor, torch.Tensor) and tensor.is_meta:
            return tensor
        return func(*args, **(kwargs or {}))
