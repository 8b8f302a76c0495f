"""``python -m wearfl`` runs the CLI."""

import sys

from wearfl.cli import main

sys.exit(main())
