"""`ray submit cluster.yaml jobs/compare.py -- --data s3://bucket/store` : the full comparison.

A thin entry point: every argument goes to `skincluster compare` (see --help).
"""

import sys

from skincluster.cli import main

if __name__ == "__main__":
    sys.exit(main(["compare", *sys.argv[1:]]))
