"""What the command lines share before JAX starts: argparse types for their flags.
"""

from __future__ import annotations

import argparse
import math


def finite_float(text: str) -> float:
    """argparse type of every float flag of the CLIs: a number, never NaN or +-inf (float() takes "nan",
    and NaN passes every range check: a NaN temperature would sample token 0 forever)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value
