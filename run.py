#!/usr/bin/env python3
"""fedpower command line: ``python run.py [CONFIG] [--out DIR] [--set key.path=value ...]``."""

import sys

from fedpower.cli import main

if __name__ == "__main__":
    sys.exit(main())
