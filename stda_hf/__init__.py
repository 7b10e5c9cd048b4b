"""Style-transfer data augmentation (ST-DA) for skin-lesion classification.

The flow (see README.md): ``phantoms``/``fetch`` -> ``split`` -> ``generate`` -> ``label`` -> ``package``
-> ``push``; ``train.py`` trains on the result and ``explain`` shows what the network looks at. Every stage
is an importable function; the ``stda`` command line only parses arguments and calls it.
"""

import importlib.abc
import importlib.util
import sys
from pathlib import Path

__version__ = "0.1.0"

LABELS = ("benign", "malignant")
"""Class names, in ClassLabel order (id 0 = benign, id 1 = malignant) everywhere in the project."""

SPLITS = ("train", "validation", "test")
"""The splits of the real images (``splits.csv``); validation and test hold real images only."""

DATASET_SPLITS = ("train", "synthetic", "validation", "test")
"""The splits of the packaged Hub dataset, in the order they are written and listed (``synthetic`` optional)."""


def _find_top_level_folders() -> None:
    """Make ``stda_hf.cards`` and ``stda_hf.dataset_script`` importable from a source checkout.

    The repository keeps ``cards/`` and ``dataset_script/`` at its top level; the wheel (and an editable
    install) maps them into the package. When ``stda_hf`` is imported from a checkout without such a
    mapping (``PYTHONPATH=.``, a stale editable install), this finder serves them from beside ``stda_hf/``.
    """
    root = Path(__file__).resolve().parent.parent
    folders = {f"{__name__}.{n}": root / n for n in ("cards", "dataset_script")}
    if any((Path(__file__).parent / n.rpartition(".")[2]).is_dir() for n in folders):
        return  # installed from the wheel: the folders are inside the package

    class _TopLevelFolders(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            folder = folders.get(name)
            if folder is None or not (folder / "__init__.py").is_file():
                return None
            return importlib.util.spec_from_file_location(
                name, folder / "__init__.py", submodule_search_locations=[str(folder)]
            )

    sys.meta_path.append(_TopLevelFolders())


_find_top_level_folders()
