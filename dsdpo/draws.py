"""Deprecated name of dsdpo.objective.draws (dsdpo 0.1's layout), kept so that old imports work.

It goes in dsdpo 0.3; import dsdpo.objective.draws instead.
"""

import sys
import warnings

from dsdpo.objective import draws as _moved

warnings.warn(
    "dsdpo.draws is now dsdpo.objective.draws; the old name goes in dsdpo 0.3",
    DeprecationWarning,
    stacklevel=2,
)
sys.modules[__name__] = _moved
