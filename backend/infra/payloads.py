"""Reading what Label Studio sends: lenient pydantic models, and one way to refuse a bad payload."""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from backend.infra.errors import BadRequest, validation_message

M = TypeVar("M", bound=BaseModel)


class Lenient(BaseModel):
    # Label Studio adds fields over time: accept and ignore what we do not use
    model_config = ConfigDict(extra="allow", populate_by_name=True)


def validated(model: type[M], value: Any, where: str) -> M:
    """`value` as a `model`, or BadRequest naming the field (`where.field: what is wrong`)."""
    if not isinstance(value, dict):
        raise BadRequest(f"{where}: an object is required")
    try:
        return model.model_validate(value)
    except ValidationError as error:
        raise BadRequest(validation_message(error, where)) from None
