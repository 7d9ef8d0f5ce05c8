"""What opendelta knows about the libraries around it.

* :mod:`opendelta.integrations.transformers`: the attention modules' arguments found by
  role and the cache view Prefix uses. Torch-only at import (it never imports
  transformers), so the methods may use it.
* :mod:`opendelta.integrations.hf_trainer`: :class:`DeltaTrainerCallback` for
  ``transformers.Trainer`` (delta-only checkpoints, quiet resume, ``save_finetuned`` at
  the end); imported explicitly, never by ``import opendelta``.
* :mod:`opendelta.integrations.distributed`: saving from DDP / FSDP2 (plain PyTorch
  engines need no integration to train).
"""
