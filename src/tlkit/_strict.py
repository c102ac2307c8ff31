"""The pydantic base shared by every tlkit config model."""

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """Base for tlkit configs: unknown keys, NaN and infinite floats are errors; assignments are validated."""

    # allow_inf_nan=False: a bound like ``ge=0`` lets ``inf`` through, and an infinite weight
    # decay or LR scale would only show up later as a NaN loss.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=(), allow_inf_nan=False)
