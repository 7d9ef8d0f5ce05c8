"""Documented path of the argument-name helpers; see :mod:`opendelta.core.signature`."""
from ..core.signature import Signature, get_arg_names, get_arg_names_inside_func, signature  # noqa: F401

__all__ = ["Signature", "signature", "get_arg_names", "get_arg_names_inside_func"]
