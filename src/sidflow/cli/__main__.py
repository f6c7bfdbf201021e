"""``python -m sidflow.cli`` (e.g. under ``torchrun ... -m sidflow.cli distill``)."""

from sidflow.cli import main

raise SystemExit(main())
