"""``stda package`` and ``stda push``: real and synthetic images as a Hub dataset repository, and its upload.

``packaging`` writes the Parquet shards, the card (``card``, from ``cards/dataset_card.md``) and the licence
files; ``publish`` uploads the folder to the Hub.
"""

from stda_hf.dataset.packaging import PackageConfig, package
from stda_hf.dataset.publish import PushConfig, push

__all__ = ["PackageConfig", "PushConfig", "package", "push"]
