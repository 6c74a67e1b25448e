"""`python -m reactor_core.train recipe.yaml [key=value ...]`: what torchrun starts.

    torchrun --nproc_per_node 2 -m reactor_core.train recipe.yaml

is `reactor train recipe.yaml` on every rank; `reactor train recipe.yaml --nproc 2`
runs exactly that for you (see `reactor_core.training.launch`).
"""

import sys

from reactor_core.cli import app

if __name__ == "__main__":
    sys.exit(app(["train", *sys.argv[1:]], prog_name="reactor train"))
