"""Integrations with training frameworks, imported explicitly (never by ``import opendelta``):

* :mod:`opendelta.integrations.hf_trainer`: :class:`DeltaTrainerCallback` for
  ``transformers.Trainer`` (delta-only checkpoints, quiet resume, ``save_finetuned`` at
  the end).

Plain PyTorch engines (DDP, FSDP2, Accelerate, DeepSpeed) need no integration to train;
:mod:`opendelta.integrations.distributed` has the helpers to save from them.
"""
