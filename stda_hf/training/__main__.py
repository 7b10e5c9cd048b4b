"""``python -m stda_hf.training``: the training command without the repository (``accelerate launch -m`` too)."""

import sys

from stda_hf.training.command import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m stda_hf.training"))
