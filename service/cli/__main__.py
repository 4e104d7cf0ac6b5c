"""``python -m service.cli``: the same as the ``saliency-serve`` console script."""

from service.cli import main

raise SystemExit(main())
