"""Names of the files of a delta checkpoint, its formats, and the errors of persistence."""
from __future__ import annotations

import os
from typing import Dict, Tuple, Union

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
LEGACY_WEIGHTS_NAME = "pytorch_model.bin"
PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_LEGACY_WEIGHTS_NAME = "adapter_model.bin"
#: safetensors metadata / config key tying a weights file to its config.json.
SAVE_ID_KEY = "opendelta_save_id"
STRUCTURE_HASH_KEY = "backbone_structure_hash"
PathLike = Union[str, "os.PathLike[str]"]

#: The checkpoint formats a directory can hold, and the files that make each of them.
#: ``config.json`` belongs to ours and to the original library's (they share it).
FORMATS: Dict[str, Tuple[str, ...]] = {
    "opendelta (config.json + model.safetensors)": (WEIGHTS_NAME,),
    "OpenDelta 0.3.x / save_function (config.json + pytorch_model.bin)": (LEGACY_WEIGHTS_NAME,),
    "PEFT adapter (adapter_config.json + adapter_model.*)": (PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME,
                                                             PEFT_LEGACY_WEIGHTS_NAME),
}
#: Every file a save writes or replaces: a save removes those it does not write, so a
#: stale checkpoint of another format never stays next to the new one.
CHECKPOINT_FILES: Tuple[str, ...] = (CONFIG_NAME, WEIGHTS_NAME, LEGACY_WEIGHTS_NAME, PEFT_CONFIG_NAME,
                                     PEFT_WEIGHTS_NAME, PEFT_LEGACY_WEIGHTS_NAME)


class CheckpointError(ValueError):
    """A checkpoint cannot be read or does not fit the backbone (the message says why)."""


class BackboneHashWarning(UserWarning):
    """The backbone differs from the one the checkpoint was trained on."""
