"""`LabelStudioMLBase`: upstream's model interface (label_studio_ml 2.x names), on our own machinery.

A model object is made once per project and kept across requests (see `registry.py`); state that
several workers must agree on (`get`/`set`, examples, model_version inputs) lives in SQLite.
"""

from __future__ import annotations

import hashlib
from functools import cached_property
from typing import Any

from label_studio_sdk.label_interface import LabelInterface

from backend.protocol.services import Services
from backend.protocol.wire import ModelResponse


class LabelStudioMLBase:
    model_version_prefix = "model"

    def __init__(self, project_id: str, label_config: str, services: Services):
        self.project_id = project_id
        self.label_config = label_config
        self.services = services
        self.settings = services.settings
        self.extra_params: dict[str, Any] = {}
        self.setup()

    # ---- the interface a model implements ----
    def setup(self) -> None:
        """Called once when the object is made (per project and label config, per process)."""

    def predict(self, tasks: list[dict[str, Any]], context: dict[str, Any] | None = None, **kwargs: Any) -> ModelResponse:
        raise NotImplementedError

    def fit(self, event: str, data: dict[str, Any], **kwargs: Any) -> None:
        """Called for each webhook event Label Studio sends."""

    # ---- helpers upstream models rely on ----
    @cached_property
    def label_interface(self) -> LabelInterface:
        return LabelInterface(self.label_config)

    def get(self, key: str) -> Any:
        return self.services.db.get_value(self.project_id, key)

    def set(self, key: str, value: Any) -> None:
        self.services.db.set_value(self.project_id, key, value)

    def set_extra_params(self, extra_params: dict[str, Any] | None) -> None:
        self.extra_params = dict(extra_params or {})

    def version_inputs(self) -> list[str]:
        """Everything that changes what the model predicts; hashed into `model_version`."""
        return [self.label_config]

    @property
    def model_version(self) -> str:
        digest = hashlib.sha256("\0".join(self.version_inputs()).encode("utf-8")).hexdigest()[:12]
        return f"{self.model_version_prefix}-{digest}"
