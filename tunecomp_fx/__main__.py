"""`python -m tunecomp_fx ...`: the tunecomp-fx command line, for environments without the console script."""

import sys

from tunecomp_fx.cli import main

sys.exit(main())
