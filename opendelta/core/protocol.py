"""The declared interface of a delta model, used by the features built on the engine
(merging, the extension API, persistence) instead of its private state."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, ContextManager, List, Optional, Protocol, Sequence, Tuple

from torch import nn

from .config import BaseDeltaConfig
from .layers import DeltaLayer, DeltaLifecycle, LayerEntry

if TYPE_CHECKING:  # pragma: no cover
    from .structure import CommonStructureMap


class DeltaModelProtocol(Protocol):
    """What :class:`~opendelta.DeltaBase` offers to the code built on it."""

    name: str
    delta_type: ClassVar[str]
    layer_name: ClassVar[str]
    layer_attr: str
    backbone_model: nn.Module
    config: BaseDeltaConfig
    lifecycle: DeltaLifecycle
    structure_mapping: Optional["CommonStructureMap"]

    def layer_entries(self) -> Tuple[LayerEntry, ...]: ...

    def host_module(self, host_name: str) -> nn.Module: ...

    def insert_layer(self, host_name: str, layer: DeltaLayer, child_name: Optional[str] = None) -> LayerEntry: ...

    def remove_layer(self, entry: LayerEntry) -> None: ...

    def resolve_targets(self, keys: Sequence[str], uses_defaults: bool = False) -> List[str]: ...

    def transaction(self) -> ContextManager[Any]: ...

    def merge(self, keep_copy: bool = False, safe: bool = False) -> None: ...

    def unmerge(self) -> None: ...

    def update_module(self, module: nn.Module, key: str) -> None: ...

    @property
    def is_merged(self) -> bool: ...
