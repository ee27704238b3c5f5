"""All purification methods; importing this package registers each of them."""

from advpurify.purifiers import dip, inpaint, ppgn, transforms  # noqa: F401  (registration)
from advpurify.purifiers.base import (
    Param,
    ParamError,
    Purifier,
    create,
    method_class,
    method_names,
    parse_assignments,
)

__all__ = [
    "Param",
    "ParamError",
    "Purifier",
    "create",
    "method_class",
    "method_names",
    "parse_assignments",
]
