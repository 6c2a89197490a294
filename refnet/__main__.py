"""``python -m refnet``: the same as the ``refnet`` command (:func:`refnet.cli.main`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
