"""Deprecated name of dsdpo.objective.losses (dsdpo 0.1's layout), kept so that old imports work.

It goes in dsdpo 0.3; import dsdpo.objective.losses instead.
"""

import sys
import warnings

from dsdpo.objective import losses as _moved

warnings.warn(
    "dsdpo.loss is now dsdpo.objective.losses; the old name goes in dsdpo 0.3",
    DeprecationWarning,
    stacklevel=2,
)
sys.modules[__name__] = _moved
