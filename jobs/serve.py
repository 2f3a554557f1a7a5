"""Entrypoint for `ray job submit --working-dir . -- python jobs/serve.py --model B ...`;
the arguments are those of `clfsys serve`. For long-lived deployments prefer
`serve deploy jobs/serve.yaml`."""

import sys

from clfsys.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
