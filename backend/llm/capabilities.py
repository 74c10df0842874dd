"""What a probe found an OpenAI-compatible endpoint can do (probe.py finds it; the client adopts it,
client.py `LLMClient.use`): kept apart so that the client needs nothing of the probe itself."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from backend.infra.errors import LLMError

MODE_NAMES = {
    "json_schema": "json_schema",
    "json_object_schema": "json_object with a schema",
    "json_object": "json_object",
    "text": "text",
}


class ProbeFailed(LLMError):
    """The endpoint could not be probed (unreachable, key refused, no form answered)."""


@dataclass
class FormResult:
    mode: str
    works: bool
    detail: str  # the error, or what the answer was like
    seconds: float


@dataclass
class Capabilities:
    endpoint: str
    model: str
    forms: list[FormResult] = field(default_factory=list)
    logprobs: bool | None = None  # None: not probed
    n: bool | None = None
    concurrency: int | None = None
    burst: str = ""  # how the concurrency figure was measured
    latency: float | None = None  # seconds for the short pre-labeling request (asked twice with `speed`: the second)
    seconds_per_token: float | None = None
    context_tokens: int | None = None  # the context window, when the endpoint tells (llama-server's /props)
    chars_per_token: float | None = None  # of the pre-labeling request's prompt, from its usage
    context: str = ""  # how the context window was found, or what the long prompt met (doctor)
    probed_at: float = 0.0

    @property
    def mode(self) -> str | None:
        """The strongest structured-output form that works."""
        return next((f.mode for f in self.forms if f.works), None)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> Capabilities:
        value = dict(value)
        value["forms"] = [FormResult(**f) for f in value.get("forms", [])]
        return cls(**value)

    def summary(self) -> str:
        """One log line: what works and what the probe measured."""
        parts = []
        rejected = [f for f in self.forms if not f.works]
        mode = self.mode
        parts.append(
            f"structured output {MODE_NAMES[mode] if mode else 'none'}"
            + "".join(f"; {MODE_NAMES[f.mode]} rejected ({f.detail})" for f in rejected)
        )
        if self.logprobs is not None:
            parts.append("logprobs returned" if self.logprobs else "no logprobs")
        if self.n is not None:
            parts.append("n honoured" if self.n else "n ignored")
        if self.concurrency is not None:
            parts.append(f"{self.concurrency} request{'s' if self.concurrency > 1 else ''} at once ({self.burst})")
        if self.latency is not None:
            parts.append(f"{self.latency:.2f} s a short pre-labeling request")
        if self.context_tokens:
            parts.append(f"a context window of {self.context_tokens} tokens")
        return f"LLM endpoint {self.endpoint} (model {self.model}): " + ", ".join(parts)
