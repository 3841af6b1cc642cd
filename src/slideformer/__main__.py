"""``python -m slideformer``: the same command as the ``slideformer`` console script."""

from slideformer.cli import main

raise SystemExit(main())
