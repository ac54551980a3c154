"""`python -m store_service`: the same as the `store-service` console script."""

from __future__ import annotations

import sys

from store_service.server import main

sys.exit(main())
