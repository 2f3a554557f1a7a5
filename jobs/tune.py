"""Entrypoint for `ray job submit --working-dir . -- python jobs/tune.py --config F --out DIR`.

The driver connects to the cluster through RAY_ADDRESS (set by `ray job submit`); the arguments
are those of `clfsys tune`.
"""

import sys

from clfsys.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
