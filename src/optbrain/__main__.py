"""``python -m optbrain`` runs the command-line tool."""

import sys

from .app.cli import main

sys.exit(main())
