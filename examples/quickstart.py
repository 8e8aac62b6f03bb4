#!/usr/bin/env python
"""The main job, as a script: the same as ``nef-transformers quickstart`` (see `nef_transformers.quickstart`).

    python examples/quickstart.py                       # embedded MNIST, runs/quickstart, < 15 min on 2 CPU cores
    python examples/quickstart.py --source ../shared/data/shapes/modelnet10_chair_32.npz --out runs/chairs
"""

import sys

from nef_transformers.quickstart import main

if __name__ == "__main__":
    sys.exit(main())
