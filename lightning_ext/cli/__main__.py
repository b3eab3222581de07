"""``python -m lightning_ext.cli``: the ``lightning-ext`` command without the console script."""

from lightning_ext.cli import main

raise SystemExit(main())
