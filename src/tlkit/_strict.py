"""The pydantic base shared by every tlkit config model."""

import difflib
from typing import Any, get_args

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """Base for tlkit configs: unknown keys, NaN and infinite floats are errors; assignments are validated."""

    # allow_inf_nan=False: a bound like ``ge=0`` lets ``inf`` through, and an infinite weight
    # decay or LR scale would only show up later as a NaN loss.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=(), allow_inf_nan=False)


def _section(model: Any, loc: tuple) -> Any:
    """The model class that holds the key at ``loc`` (a pydantic error location), or ``None``."""
    for part in loc[:-1]:
        if isinstance(part, int):  # an item of a list field: its element model was taken already
            continue
        info = getattr(model, "model_fields", {}).get(part)
        model = _model_in(getattr(info, "annotation", None))
        if model is None:
            return None
    return model


def _model_in(annotation: Any) -> Any:
    """``annotation`` if it is a model class, else the one model class among its arguments (``list[Phase]``)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    found = [a for a in get_args(annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
    return found[0] if len(found) == 1 else None


def close_keys(root: type[BaseModel], loc: tuple) -> list[str]:
    """Field names close to the unknown key at ``loc`` under ``root`` (for "did you mean"), best first.

    A pydantic ``extra_forbidden`` error has ``loc`` ending in the unknown key; a wrapped section
    (a union, a list) gives no suggestion rather than a wrong one. Kept out of validation itself:
    a model validator would run the header's strict JSON validation in Python mode.
    """
    model, key = _section(root, loc), loc[-1] if loc else None
    if model is None or not isinstance(key, str):
        return []
    known = sorted(set(model.model_fields) | {f.alias for f in model.model_fields.values() if f.alias})
    return difflib.get_close_matches(key, known, n=3, cutoff=0.6)
