"""`python -m keel_client.cli`: the `keel` command."""

import sys

from keel_client.cli import main

sys.exit(main())
