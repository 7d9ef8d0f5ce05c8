"""What opendelta knows about transformers' internals, kept in one place.

* :mod:`.roles`: finds a ``forward`` argument by its *role* (hidden states, attention mask,
  KV cache, ...) from the signature: known spellings, annotations and position, so that a
  renamed argument (transformers 5.24 renamed ``past_key_values`` to ``cache``) is still
  found, and an unknown signature fails with the tested version range in the message;
* :mod:`.attention`: the attention classes prefix tuning supports, their roles, the
  ``PrefixedCache`` view and the attention-mask extension.

None of these modules imports ``transformers``: they read signatures and duck-type the
objects they are given, so ``import opendelta`` stays torch-only.
"""
