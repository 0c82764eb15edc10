"""Every test runs with the invariant checks on: each pass that promises unchanged outputs is
checked numerically (CompressionConfig.check_numerics defaults to this variable)."""

import os

from tunecomp_fx.config import CHECK_NUMERICS_ENV

os.environ.setdefault(CHECK_NUMERICS_ENV, "1")

from hypothesis import settings

# Property tests see the same examples on every run (reliable CI); `--hypothesis-profile=explore`
# draws fresh ones.
settings.register_profile("default", derandomize=True, database=None)
settings.register_profile("explore", derandomize=False, database=None)
settings.load_profile("default")
