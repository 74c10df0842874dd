"""LLM pre-labeling of named entities for Label Studio: the machinery behind `model.py`."""

__version__ = "0.1.0"
