"""The original library's DeltaCenter arguments, kept so old scripts run.

The DeltaCenter (THUNLP's delta-sharing service) no longer exists; checkpoints are shared
through the Hugging Face Hub (``save_finetuned(push_to_hub=True, repo_id=...)``). These
helpers still build the argument set and default name the original computed, so code that
reads them keeps working.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

#: the DeltaCenter fields, with the other names ``center_args_pool`` may use for them.
CENTER_FIELDS: Dict[str, tuple] = {
    "name": (),
    "backbone_model": ("model_name_or_path",),
    "model_path_public_name": (),
    "delta_type": (),
    "train_tasks": ("task_name", "train_task"),
    "train_datasets": ("dataset_name", "train_dataset"),
    "test_tasks": ("test_task",),
    "test_datasets": ("test_dataset",),
    "test_performance": ("test_result",),
    "usage": (),
    "description": (),
}


def create_delta_center_args(center_args: Optional[Dict[str, Any]], center_args_pool: Optional[Dict[str, Any]],
                             defaults: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The DeltaCenter arguments: ``center_args`` (exact field names) wins over
    ``center_args_pool`` (field names or their alternatives), which wins over ``defaults``."""
    center_args = dict(center_args or {})
    pool = dict(center_args_pool or {})
    unknown = set(center_args) - set(CENTER_FIELDS)
    if unknown:
        raise ValueError(f"center_args has unknown field(s) {sorted(unknown)}; fields: {sorted(CENTER_FIELDS)}")
    out: Dict[str, Any] = {}
    for field, alternatives in CENTER_FIELDS.items():
        for source, names in ((center_args, (field,)), (pool, (field, *alternatives))):
            hit = next((n for n in names if n in source), None)
            if hit is not None:
                out[field] = source[hit]
                break
        else:
            out[field] = (defaults or {}).get(field)
    return out


def create_default_name(**kwargs: Any) -> str:
    """The original's default checkpoint name: ``<model_path_public_name>_<delta_type>_<dataset>``,
    leaving out what is not given."""
    parts = [kwargs.get("model_path_public_name"), kwargs.get("delta_type"),
             kwargs.get("dataset") or kwargs.get("train_datasets")]
    return "_".join(str(p).replace("/", "-") for p in parts if p)
