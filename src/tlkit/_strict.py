"""The pydantic base shared by every tlkit config model."""

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """Base for tlkit configs: unknown keys are an error, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())
