"""``python -m treadle.serve --model-path M [--port P] ...``: the same as ``treadle serve``."""

import sys

from treadle.server.serve_cmd import main

if __name__ == "__main__":
    sys.exit(main())
