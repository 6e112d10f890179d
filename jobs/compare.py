"""`ray submit cluster.yaml jobs/compare.py -- --data s3://bucket/store` : the full comparison.

A thin entry point: every argument goes to `skincluster compare` (see --help).
"""

import os
import sys

from skincluster.cli import main

if __name__ == "__main__":
    # `ray submit` runs this on the head node, beside the cluster that `ray start` made:
    # join that cluster ("auto"), never start a private one there. Under `ray job submit`
    # Ray has already set RAY_ADDRESS.
    os.environ.setdefault("RAY_ADDRESS", "auto")
    sys.exit(main(["compare", *sys.argv[1:]]))
