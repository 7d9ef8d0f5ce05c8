"""Documented module paths of OpenDelta's ``opendelta.utils``, kept as thin re-exports.

The code lives in the layered packages: :mod:`opendelta.core` (engine),
:mod:`opendelta.io` (checkpoints), :mod:`opendelta.tools` (visualization, inspection)
and :mod:`opendelta.integrations`.
"""
