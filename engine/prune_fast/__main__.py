import sys

from engine.prune_fast.cli import main

sys.exit(main())
