"""``python -m proxy``: the command line.  Importing this module (a tool walking the package) runs nothing."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
