"""`python -m ray_jobs.cli`: the same as the `bae` command."""

import sys

from ray_jobs.cli import main

sys.exit(main())
