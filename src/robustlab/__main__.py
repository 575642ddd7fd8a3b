"""``python -m robustlab ...`` (and ``torchrun ... -m robustlab ...``): the command line of
:mod:`robustlab.cli`."""

from robustlab.cli import main

raise SystemExit(main())
