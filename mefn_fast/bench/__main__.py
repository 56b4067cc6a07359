"""``python -m mefn_fast.bench``."""
import sys

from .runner import main

sys.exit(main())
