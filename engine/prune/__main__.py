"""`python -m engine.prune`."""

import sys

from engine.prune.train import main

sys.exit(main())
