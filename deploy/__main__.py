"""``python -m treadle.deploy up|status|down SPEC``: the same as ``treadle fleet ...``."""

import sys

from treadle.deploy.cli import main

if __name__ == "__main__":
    sys.exit(main())
