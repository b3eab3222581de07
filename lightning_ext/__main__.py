"""``python -m lightning_ext``: the ``lightning-ext`` command without the console script."""

from lightning_ext.cli import main

raise SystemExit(main())
