"""What to pre-label, read from a project's label config through the SDK's `LabelInterface`.

Every `<Labels>` tag that points at a `<Text>` (or `<HyperText>`-free plain text) object becomes one
`NerTarget`: the labels (with their `hint`/`alias`), the result names, and the task data key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property, lru_cache

from label_studio_sdk.label_interface import LabelInterface

from backend.infra.errors import UnsupportedLabelConfig

SUPPORTED = (
    'a <Labels name="..." toName="X"> tag whose toName is a <Text name="X" value="$key"> object, '
    'e.g. <View><Labels name="label" toName="text"><Label value="PER"/></Labels>'
    '<Text name="text" value="$text"/></View>'
)
TRUE_VALUES = {"true", "1", "yes"}


@dataclass(frozen=True)
class LabelDef:
    """One label: `name` is what results carry (the alias if set), `shown` what annotators see."""

    name: str
    shown: str
    hint: str | None = None

    @property
    def description(self) -> str | None:
        parts = []
        if self.shown != self.name:
            parts.append(self.shown)
        if self.hint:
            parts.append(self.hint)
        return " - ".join(parts) or None


@dataclass(frozen=True)
class NerTarget:
    """One `<Labels>` → `<Text>` pair: everything needed to prompt for it and emit its results."""

    from_name: str
    to_name: str
    data_key: str
    labels: tuple[LabelDef, ...]
    allow_overlap: bool = False
    shared: bool = False  # the <Labels> serves several <Text> objects (toName="t1,t2"): one target each

    @cached_property
    def key(self) -> str:
        """What this target's examples, drafts and prompts are filed under: the <Labels> name, or
        `name>toName` when one <Labels> serves several texts (each its own target, or one text's
        corrections would overwrite the other's)."""
        return f"{self.from_name}>{self.to_name}" if self.shared else self.from_name

    def owns(self, region: dict) -> bool:
        """Whether a result region belongs to this target: its from_name, and its to_name when the
        <Labels> serves several texts."""
        return region.get("from_name") == self.from_name and (not self.shared or region.get("to_name") == self.to_name)

    @cached_property
    def label_names(self) -> tuple[str, ...]:
        return tuple(label.name for label in self.labels)

    @cached_property
    def label_set(self) -> frozenset[str]:
        return frozenset(self.label_names)


@dataclass(frozen=True)
class NerSchema:
    targets: tuple[NerTarget, ...]
    # <TextArea name=...> per <Text> name: where annotators may type guidelines (issue: interactive)
    textareas: dict[str, tuple[str, ...]] = field(default_factory=dict, hash=False, compare=False)


def _data_key(value: str | None) -> str | None:
    if value and value.startswith("$") and len(value) > 1:
        return value[1:]
    return None


@lru_cache(maxsize=64)
def parse_label_config(config: str) -> NerSchema:
    """Parse once per distinct config (the cache is per process and keyed by the XML itself)."""
    if not config or not config.strip():
        raise UnsupportedLabelConfig("the label config is empty; supported: " + SUPPORTED)
    try:
        interface = LabelInterface(config)
    except Exception as error:  # the SDK raises many kinds on bad XML
        raise UnsupportedLabelConfig(f"the label config could not be parsed ({error}); supported: {SUPPORTED}") from None

    targets: list[NerTarget] = []
    textareas: dict[str, list[str]] = {}
    for control in interface.controls:
        if control.tag == "TextArea":
            for to_name in control.to_name or []:
                textareas.setdefault(to_name, []).append(control.name)
            continue
        if control.tag != "Labels":
            continue
        for to_name in (to_names := control.to_name or []):
            try:
                obj = interface.get_object(to_name)
            except Exception:
                obj = None
            if obj is None or obj.tag != "Text":
                continue
            key = _data_key(obj.value)
            if key is None:
                continue
            labels = tuple(
                LabelDef(name=name, shown=tag.attr.get("value", name), hint=tag.attr.get("hint") or None)
                for name, tag in control.labels_attrs.items()
            )
            if not labels:
                continue
            overlap = str(control.attr.get("allowOverlap", "")).lower() in TRUE_VALUES
            targets.append(NerTarget(control.name, to_name, key, labels, overlap, shared=len(to_names) > 1))

    if not targets:
        raise UnsupportedLabelConfig("the label config has no <Labels> for a <Text> object; supported: " + SUPPORTED)
    return NerSchema(
        targets=tuple(targets),
        textareas={k: tuple(v) for k, v in textareas.items()},
    )
