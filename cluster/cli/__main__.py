"""`python -m cluster.cli`: the same entry as the `mistral-cluster` console script."""

import sys

from cluster.cli import main

sys.exit(main())
