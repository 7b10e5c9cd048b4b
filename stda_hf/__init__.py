"""Style-transfer data augmentation (ST-DA) for skin-lesion classification.

The flow (see README.md): ``phantoms``/``fetch`` -> ``split`` -> ``generate`` -> ``label`` -> ``package``
-> ``push``; ``train.py`` trains on the result and ``explain`` shows what the network looks at. Every stage
is an importable function; the ``stda`` command line only parses arguments and calls it.
"""

__version__ = "0.1.0"

LABELS = ("benign", "malignant")
"""Class names, in ClassLabel order (id 0 = benign, id 1 = malignant) everywhere in the project."""

SPLITS = ("train", "validation", "test")
"""The splits of the real images (``splits.csv``); validation and test hold real images only."""

DATASET_SPLITS = ("train", "synthetic", "validation", "test")
"""The splits of the packaged Hub dataset, in the order they are written and listed (``synthetic`` optional)."""
