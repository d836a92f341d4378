"""``python -m bench`` (and the ``upg-bench`` script): see :mod:`bench.cli`."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
