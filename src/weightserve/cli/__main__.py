"""`python -m weightserve.cli ...`, the same as the `weightserve` script."""

import sys

from weightserve.cli import main

sys.exit(main())
