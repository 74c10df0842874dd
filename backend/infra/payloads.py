"""Reading what Label Studio sends: lenient pydantic models, and one way to refuse a bad payload."""

from __future__ import annotations

from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError

from backend.infra.errors import BadRequest, validation_message

M = TypeVar("M", bound=BaseModel)

MAX_ID = 2**63 - 1  # SQLite's and PostgreSQL's largest integer; Label Studio's ids are far below
# An id of Label Studio's (task, annotation, project): a JSON integer from 1 to MAX_ID. Strict: `true`
# would be 1 and "3" would be 3 under pydantic's lax rules, and either could name a real object.
Id = Annotated[StrictInt, Field(ge=1, le=MAX_ID)]


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
