"""Entrypoint for `ray job submit --working-dir . -- python jobs/label.py --model B --input P
--output DIR`; the arguments are those of `clfsys label`."""

import sys

from clfsys.cli import main

if __name__ == "__main__":
    sys.exit(main(["label", *sys.argv[1:]]))
