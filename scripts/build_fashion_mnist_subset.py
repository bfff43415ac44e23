"""Rebuild src/rsrouter/data/fashion_mnist_subset.npz from the raw Fashion-MNIST IDX files.

Usage: python scripts/build_fashion_mnist_subset.py [ROOT]   (default: $RSROUTER_DATA)
The draw is class-balanced (200 train + 50 test images per class) and seeded, so a rebuild gives
the same file contents.
"""

import os
import sys

from rsrouter.data import build_subset

root = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("RSROUTER_DATA")
if not root:
    sys.exit("usage: build_fashion_mnist_subset.py ROOT  (the folder holding fashion-mnist/)")
print(f"wrote {build_subset(root)}")
