"""Ray-facing side of the sharded cluster: placement, workers, the router actor, the served endpoint."""

import time

IMPORTED_AT = time.time()  # when this process began importing the package: a restarted worker's start phases
