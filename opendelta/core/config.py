"""Configuration objects of delta models: dataclasses that round-trip through JSON."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, List, Optional

#: keys written by the original OpenDelta (or by us) that carry no hyperparameter.
INFORMATIONAL_KEYS = ("opendelta_version", "transformers_version", "torch_version")


@dataclass
class BaseDeltaConfig:
    """Fields shared by every delta method.

    Args:
        modified_modules: keys naming the modules to modify (see name-based addressing);
            ``None`` means the method's default targets for the backbone's architecture.
        exclude_modules: module-name prefixes never modified.
        unfrozen_modules: what :meth:`DeltaBase.freeze_module` leaves trainable; default
            ``["deltas"]`` (all delta parameters).
        common_structure: ``modified_modules`` are common-structure names (``attn.q``).
        backbone_class: class name of the backbone the delta was made on.
        backbone_checkpoint_name: name or path of the backbone's pretrained checkpoint.
        backbone_hash: hash of the backbone (structure and parameters), see
            :func:`opendelta.io.hashing.gen_model_hash`.
    """

    delta_type: ClassVar[str] = ""

    modified_modules: Optional[List[str]] = None
    exclude_modules: Optional[List[str]] = None
    unfrozen_modules: Optional[List[str]] = None
    common_structure: Optional[bool] = None
    backbone_class: Optional[str] = None
    backbone_checkpoint_name: Optional[str] = None
    backbone_hash: Optional[str] = None
    #: keys read from a file that are no field of this config; kept so a round trip loses nothing.
    extra: Dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("modified_modules", "exclude_modules", "unfrozen_modules"):
            value = getattr(self, name)
            if isinstance(value, str):
                raise TypeError(f"{name} must be a list of strings, not the string {value!r}; "
                                f"write [{value!r}]")
            if value is not None:
                setattr(self, name, list(value))
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the rule a hyperparameter breaks (override per method)."""

    # ------------------------------------------------------------------ dict / JSON
    @classmethod
    def field_names(cls) -> List[str]:
        return [f.name for f in dataclasses.fields(cls) if f.name != "extra"]

    @classmethod
    def hyperparameter_names(cls) -> List[str]:
        """Fields specific to the method (not those of :class:`BaseDeltaConfig`)."""
        base = set(BaseDeltaConfig.field_names())
        return [n for n in cls.field_names() if n not in base]

    def to_dict(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"delta_type": self.delta_type}
        for name in self.field_names():
            out[name] = _jsonable(getattr(self, name))
        out.update({k: v for k, v in self.extra.items() if k not in out})
        return out

    @classmethod
    def from_dict(cls, config: Dict[str, Any], **overrides: Any) -> "BaseDeltaConfig":
        """Build from a dict; keyword ``overrides`` win over values of ``config``."""
        merged = {**config, **overrides}
        merged.pop("delta_type", None)
        known = set(cls.field_names())
        kwargs = {k: v for k, v in merged.items() if k in known}
        extra = {k: v for k, v in merged.items() if k not in known and k != "extra"}
        extra.update(merged.get("extra") or {})
        return cls(**kwargs, extra=extra)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json_string(cls, text: str) -> "BaseDeltaConfig":
        return cls.from_dict(json.loads(text))

    def copy(self, **changes: Any) -> "BaseDeltaConfig":
        return type(self).from_dict(self.to_dict(), **changes)


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value
