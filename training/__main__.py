"""`python -m adapterserve.training ...` = `adapterserve train ...`."""

from adapterserve.training.cli import main

raise SystemExit(main())
