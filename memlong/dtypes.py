"""The one table of tensor dtypes by name (configs, CLI flags and saved files name dtypes as strings).

Example:
    >>> to_dtype("bfloat16")
    torch.bfloat16
    >>> dtype_name(torch.float16)
    'float16'
"""

from __future__ import annotations

import torch

__all__ = ["DTYPES", "dtype_name", "to_dtype"]

DTYPES: dict[str, torch.dtype] = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
                                  "float64": torch.float64}


def to_dtype(value: str | torch.dtype) -> torch.dtype:
    """``value`` as a ``torch.dtype`` (a dtype passes through).

    Raises:
        ValueError: a name not in :data:`DTYPES`.
    """
    if isinstance(value, torch.dtype):
        return value
    if value not in DTYPES:
        raise ValueError(f"Unknown dtype {value!r}; use one of {sorted(DTYPES)}.")
    return DTYPES[value]


def dtype_name(dtype: torch.dtype) -> str:
    """The name of ``dtype`` in :data:`DTYPES` (``torch.float16`` -> ``"float16"``)."""
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"No name for dtype {dtype}; known: {sorted(DTYPES)}.")
