"""One model object per project, kept across requests and remade only when the label config changes."""

from __future__ import annotations

import importlib
import threading

from backend.protocol.base import LabelStudioMLBase
from backend.protocol.services import Services


def load_model_class(path: str = "model:NERModel") -> type[LabelStudioMLBase]:
    """The model class the backend serves (`module:Class`): the server, the RQ worker and the command line load it here."""
    module_name, _, class_name = path.partition(":")
    return getattr(importlib.import_module(module_name), class_name)


class ModelRegistry:
    def __init__(self, model_class: type[LabelStudioMLBase], services: Services):
        self.model_class = model_class
        self.services = services
        self._models: dict[str, LabelStudioMLBase] = {}
        self._lock = threading.Lock()

    def get(self, project_id: str, label_config: str) -> LabelStudioMLBase:
        with self._lock:
            model = self._models.get(project_id)
            if model is None or model.label_config != label_config:
                model = self.model_class(project_id, label_config, self.services)
                self._models[project_id] = model
            return model
