"""Base class for every typed settings block, so all of them reject unknown keys the same way."""

from pydantic import BaseModel, ConfigDict


class Settings(BaseModel):
    """Strict settings: unknown keys are errors, values are validated on assignment too, and numbers
    must be finite (`epochs: .inf` would pass `gt=0` and overflow later, in plan and in the schedule)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)
