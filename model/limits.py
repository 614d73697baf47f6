"""Input limits shared by training and serving (one place, so both refuse the same values).

``MAX_ABS_FEATURE`` bounds the magnitude of any feature value: larger finite values (e.g. 3e38)
would be trained on and poison the running scaler for good, or overflow the encoder. The worker
dead-letters such samples as ``out_of_range``; the service answers 422 ``out_of_range``. Both
take it as their default and let the operator raise it.

Example:
    >>> from model.limits import MAX_ABS_FEATURE
    >>> MAX_ABS_FEATURE
    1000000.0
"""

from __future__ import annotations

__all__ = ["MAX_ABS_FEATURE"]

MAX_ABS_FEATURE = 1e6
