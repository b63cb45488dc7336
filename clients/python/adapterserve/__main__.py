"""`python -m adapterserve ...` runs the `adapterserve` command line."""

import sys

from adapterserve.cli import main

sys.exit(main())
