"""Deprecated name of dsdpo.objective.elbo (dsdpo 0.1's layout), kept so that old imports work.

It goes in dsdpo 0.3; import dsdpo.objective.elbo instead.
"""

import sys
import warnings

from dsdpo.objective import elbo as _moved

warnings.warn(
    "dsdpo.diffusion is now dsdpo.objective.elbo; the old name goes in dsdpo 0.3",
    DeprecationWarning,
    stacklevel=2,
)
sys.modules[__name__] = _moved
