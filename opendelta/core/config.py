"""Configuration objects of delta models: they round-trip through dicts and JSON files.

Built-in configs are dataclasses. A configuration written the way the OpenDelta manual
shows, a plain subclass whose ``__init__`` declares its own hyperparameters and stores
them with :func:`opendelta.utils.signature.get_arg_names_inside_func`::

    class MyConfig(BaseDeltaConfig):
        def __init__(self, my_rank=4, **kwargs):
            super().__init__(**kwargs)
            for name in get_arg_names_inside_func(self.__init__):
                if not hasattr(self, name):
                    setattr(self, name, locals()[name])

works the same way: the arguments of every hand-written ``__init__`` in the class
hierarchy count as fields (:meth:`BaseDeltaConfig.field_names`), so ``to_dict``,
``from_dict``, ``copy``, ``==``, ``save_finetuned`` and ``from_finetuned`` see them.

**Field validation** (see :mod:`opendelta.core.fields`): every field declares its type,
range and finiteness once, next to its default, and the rule runs for constructor
arguments, ``from_dict`` / ``config.json`` and ``copy`` alike::

    from opendelta.core.fields import boolean, integer, number, text, validated

    @dataclass
    class MyMethodConfig(BaseDeltaConfig):
        delta_type = "my_method"
        rank: int = validated(8, integer(minimum=1))                      # bool refused
        alpha: float = validated(16.0, number())                          # finite
        dropout: float = validated(0.0, number(minimum=0, maximum=1, exclusive_maximum=True))
        init: str = validated("gaussian", text(choices=("gaussian", "zeros")))
        use_bias: bool = validated(False, boolean())

A broken rule raises :class:`~opendelta.core.fields.ConfigFieldError` (both a ``TypeError``
and a ``ValueError``) naming the config, the field, the value and the rule; loaders turn it
into a ``CheckpointError`` naming the file. Rules that tie several fields together go in
:meth:`BaseDeltaConfig.validate`, which runs after the per-field rules. A hand-written
config declares ``field_rules = {"my_rank": integer(minimum=1)}``; its rules run when it
goes through ``from_dict`` / ``copy`` (every delta model copies its config).
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, List, Optional, Tuple, Union

from ..version import __version__
from .fields import boolean, check_fields, string_list, text, validated

#: keys written by the original OpenDelta (or by us) that carry no hyperparameter.
INFORMATIONAL_KEYS = ("opendelta_version", "transformers_version", "torch_version")
#: file name of a configuration inside a checkpoint directory.
CONFIG_NAME = "config.json"
#: weights files of delta checkpoints (ours, OpenDelta 0.3.x's, PEFT's); see opendelta.io.names.
_CHECKPOINT_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "adapter_model.safetensors", "adapter_model.bin")
PathLike = Union[str, "os.PathLike[str]"]


@dataclass(eq=False, repr=False)
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

    modified_modules: Optional[List[str]] = validated(None, string_list())
    exclude_modules: Optional[List[str]] = validated(None, string_list())
    unfrozen_modules: Optional[List[str]] = validated(None, string_list())
    common_structure: Optional[bool] = validated(None, boolean(nullable=True))
    backbone_class: Optional[str] = validated(None, text(nullable=True))
    backbone_checkpoint_name: Optional[str] = validated(None, text(nullable=True))
    backbone_hash: Optional[str] = validated(None, text(nullable=True))
    #: keys read from a file that are no field of this config; kept so a round trip loses nothing.
    extra: Dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        # A hand-written __init__ sets its own fields after this runs: check what is there
        # (from_dict and copy check again once everything is set).
        check_fields(self, only_present=True)
        for name in ("modified_modules", "exclude_modules", "unfrozen_modules"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, list(value))
        self.validate()

    def validate(self) -> None:
        """Rules between several fields (override per method); raise ``ValueError`` naming
        the rule. Runs after each field's declared rule (:mod:`opendelta.core.fields`)."""

    # ------------------------------------------------------------------ fields
    @classmethod
    def field_names(cls) -> List[str]:
        """Names of every field: the dataclass fields (without ``extra``), then the named
        arguments of hand-written ``__init__`` methods of the class hierarchy, base first."""
        names = [f.name for f in dataclasses.fields(cls) if f.name != "extra"]
        for klass in reversed(cls.__mro__):
            own = vars(klass)
            # A class processed by @dataclass has its own __dataclass_fields__; any other
            # __init__ in the hierarchy was written by hand.
            if "__init__" not in own or "__dataclass_fields__" in own:
                continue
            for param in list(inspect.signature(own["__init__"]).parameters.values())[1:]:
                if param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY) \
                        and param.name not in names and param.name != "extra":
                    names.append(param.name)
        return names

    @classmethod
    def hyperparameter_names(cls) -> List[str]:
        """Fields specific to the method (not those of :class:`BaseDeltaConfig`)."""
        base = set(BaseDeltaConfig.field_names())
        return [n for n in cls.field_names() if n not in base]

    # ------------------------------------------------------------------ dict / JSON
    def to_dict(self) -> Dict[str, Any]:
        """``delta_type``, every field, then the ``extra`` keys (JSON-ready values)."""
        out: Dict[str, Any] = {"delta_type": self.delta_type}
        for name in self.field_names():
            if hasattr(self, name):
                out[name] = _jsonable(getattr(self, name))
        out.update({k: v for k, v in getattr(self, "extra", {}).items() if k not in out})
        return out

    @classmethod
    def from_dict(cls, config_dict: Dict[str, Any], **overrides: Any) -> "BaseDeltaConfig":
        """Build from a dict; keyword ``overrides`` win over values of ``config_dict``. Keys
        that are no field go to ``extra``."""
        merged = {**config_dict, **overrides}
        delta_type = merged.pop("delta_type", None)
        known = set(cls.field_names())
        values = {k: v for k, v in merged.items() if k in known}
        extra = {k: v for k, v in merged.items() if k not in known and k != "extra"}
        extra.update(merged.get("extra") or {})
        built = cls._construct(values, extra)
        if delta_type and not cls.delta_type:
            # A config class that does not name its method (a user's, written the manual's
            # way) remembers, per instance, which method it describes.
            built.delta_type = delta_type  # type: ignore[misc]  # ClassVar, overridden per instance
        return built

    @classmethod
    def _construct(cls, values: Dict[str, Any], extra: Dict[str, Any]) -> "BaseDeltaConfig":
        """``cls(**values)``, for hand-written ``__init__`` methods too: values the
        constructor does not accept are set as attributes afterwards."""
        params = inspect.signature(cls).parameters
        open_kwargs = any(p.kind is p.VAR_KEYWORD for p in params.values())
        passed = {k: v for k, v in values.items() if open_kwargs or k in params}
        if open_kwargs or "extra" in params:
            passed["extra"] = extra
        config = cls(**passed)
        for name, value in values.items():
            if name not in passed:
                setattr(config, name, value)
        for f in dataclasses.fields(BaseDeltaConfig):  # an __init__ that skipped super().__init__
            if f.name not in vars(config) and f.name != "extra":
                setattr(config, f.name, f.default)
        if "extra" not in passed:
            config.extra = {**vars(config).get("extra", {}), **extra}
        check_fields(config)  # values set after the constructor (hand-written configs) too
        return config

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json_string(cls, text: str) -> "BaseDeltaConfig":
        return cls.from_dict(json.loads(text))

    def copy(self, **changes: Any) -> "BaseDeltaConfig":
        return type(self).from_dict(self.to_dict(), **changes)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return _compared(self) == _compared(other)

    def __repr__(self) -> str:
        fields = ", ".join(f"{n}={getattr(self, n)!r}" for n in self.field_names() if hasattr(self, n))
        return f"{type(self).__name__}({fields})"

    # ------------------------------------------------------------------ files
    def save_finetuned(self, save_directory: PathLike, push_to_hub: bool = False, **kwargs: Any) -> str:
        """Write this configuration to ``save_directory/config.json``, so that
        :meth:`from_finetuned` (and :meth:`AutoDeltaConfig.from_finetuned`) read it back.

        The file is written atomically: to a temporary file in the same directory, then
        renamed over ``config.json``; a crash never leaves a half-written file.

        Args:
            save_directory: directory of the configuration (created if absent).
            push_to_hub: not supported for a configuration alone; save the delta model
                with ``delta_model.save_finetuned(..., push_to_hub=True)`` instead.

        Returns:
            the path of the written ``config.json``.

        Raises:
            ValueError: ``save_directory`` is a file or holds a delta checkpoint's weights
                (a config alone must not be paired with them), or ``push_to_hub=True``.
            TypeError: an unknown keyword argument.
        """
        if kwargs:
            raise TypeError(f"save_finetuned() got unexpected argument(s) {sorted(kwargs)}")
        if push_to_hub:
            raise ValueError("push_to_hub=True is not supported when saving a configuration alone; "
                             "save the delta model with delta_model.save_finetuned(path, push_to_hub=True), "
                             "which uploads its config.json together with its weights")
        directory = os.fspath(save_directory)
        if os.path.isfile(directory):
            raise ValueError(f"save_directory {directory!r} is a file; pass the directory that "
                             f"should hold {CONFIG_NAME}")
        weights = [n for n in _CHECKPOINT_WEIGHTS if os.path.isfile(os.path.join(directory, n))]
        if weights:
            raise ValueError(f"save_directory {directory!r} holds a delta checkpoint ({', '.join(weights)}); "
                             f"writing only its {CONFIG_NAME} would pair a new configuration with the old "
                             "weights. Save the delta model (delta_model.save_finetuned) or choose another "
                             "directory; nothing was written")
        os.makedirs(directory, exist_ok=True)
        data = self.to_dict()
        data["opendelta_version"] = __version__
        target = os.path.join(directory, CONFIG_NAME)
        _write_atomically(target, json.dumps(data, indent=2, sort_keys=True) + "\n")
        return target

    @classmethod
    def from_finetuned(cls, finetuned_delta_path: PathLike, cache_dir: Optional[PathLike] = None,
                       return_unused_kwargs: bool = False, **kwargs: Any
                       ) -> Union["BaseDeltaConfig", Tuple["BaseDeltaConfig", Dict[str, Any]]]:
        """Read a configuration saved by :meth:`save_finetuned` (or inside a delta
        checkpoint, ours or OpenDelta 0.3.x's).

        Args:
            finetuned_delta_path: a directory holding ``config.json``, or the path of the
                configuration JSON file itself. For a Hugging Face Hub repo use
                :meth:`opendelta.AutoDeltaConfig.from_finetuned`.
            cache_dir: looked in first: ``cache_dir/finetuned_delta_path``.
            return_unused_kwargs: also return the keyword arguments that are no field.
            **kwargs: field values that override the file's.

        Returns:
            an instance of ``cls`` (and, with ``return_unused_kwargs``, the dict of unused
            keyword arguments).

        Raises:
            FileNotFoundError: no such file or directory, or no ``config.json`` in it.
            ValueError: invalid JSON, or the file describes another delta type than ``cls``.
            TypeError: unknown keyword arguments (without ``return_unused_kwargs``).
        """
        known = set(cls.field_names())
        unused = {k: v for k, v in kwargs.items() if k not in known}
        if unused and not return_unused_kwargs:
            raise TypeError(f"{cls.__name__}.from_finetuned() got argument(s) {sorted(unused)} that are "
                            f"no field of {cls.__name__}; its fields are {sorted(known)}")
        path = resolve_config_file(finetuned_delta_path, cache_dir)
        data = read_config_json(path)
        stored = data.get("delta_type")
        if cls.delta_type and stored and _normal(stored) != _normal(cls.delta_type):
            source = os.fspath(finetuned_delta_path)
            raise ValueError(f"{path} describes a {stored!r} delta, not a {cls.delta_type!r} one; "
                             f"load it with opendelta.AutoDeltaConfig.from_finetuned({source!r})")
        config = cls.from_dict(data, **{k: v for k, v in kwargs.items() if k in known})
        return (config, unused) if return_unused_kwargs else config


# ---------------------------------------------------------------------- file helpers
def resolve_config_file(path: PathLike, cache_dir: Optional[PathLike] = None) -> str:
    """The configuration JSON file named by ``path``: the file itself, or
    ``path/config.json`` for a directory (``cache_dir/path`` is tried first).

    Raises:
        FileNotFoundError: neither exists; the message says what the directory holds.
    """
    path = os.fspath(path)
    candidates = [os.path.join(os.fspath(cache_dir), path)] if cache_dir is not None else []
    for candidate in candidates + [path]:
        if os.path.isfile(candidate):
            return candidate
        if os.path.isdir(candidate):
            target = os.path.join(candidate, CONFIG_NAME)
            if os.path.isfile(target):
                return target
            present = sorted(os.listdir(candidate))
            raise FileNotFoundError(f"{candidate} holds no {CONFIG_NAME} (found: {present or 'nothing'})")
    raise FileNotFoundError(f"no configuration file or directory at {path!r}; pass a directory holding "
                            f"{CONFIG_NAME} or the JSON file itself (for a Hugging Face Hub repo use "
                            "opendelta.AutoDeltaConfig.from_finetuned)")


def read_config_json(path: PathLike, cache_dir: Optional[PathLike] = None) -> Dict[str, Any]:
    """The dict stored in a configuration JSON file, or in ``config.json`` of a directory.

    Raises:
        FileNotFoundError: see :func:`resolve_config_file`.
        ValueError: the file is not JSON or holds no JSON object; the message names it.
    """
    return load_json_object(resolve_config_file(path, cache_dir))


def load_json_object(path: str) -> Dict[str, Any]:
    """The JSON object (a dict) in file ``path``.

    Raises:
        ValueError: the file is not valid JSON, or holds something else than an object.
    """
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); the file is damaged") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, found {type(data).__name__}")
    return data


def _write_atomically(target: str, text: str) -> None:
    """Write ``text`` to ``target`` through a temporary file in the same directory and
    ``os.replace``: readers see the old file or the new one, never a partial one."""
    handle, temp = tempfile.mkstemp(prefix=f".{os.path.basename(target)}.", suffix=".tmp",
                                    dir=os.path.dirname(target) or ".")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, target)
    except BaseException:
        if os.path.exists(temp):
            os.remove(temp)
        raise


def _compared(config: BaseDeltaConfig) -> Dict[str, Any]:
    """What ``==`` compares: ``delta_type`` and every field (``extra`` is left out)."""
    values = {name: getattr(config, name, None) for name in config.field_names()}
    values["delta_type"] = config.delta_type
    return values


def _normal(delta_type: str) -> str:
    return delta_type.lower().replace("-", "_")


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value
