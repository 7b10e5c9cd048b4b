"""``stda fetch``: benign and malignant images from the ISIC Archive into a real-image folder.

``stage`` runs the fetch; ``api`` is the ISIC Archive v2 client, ``downloads`` the worker pool, ``records``
what the folder records about each image, ``http`` the retrying, redacting HTTP client.
"""

from stda_hf.fetch.stage import FetchConfig, dry_run, fetch

__all__ = ["FetchConfig", "dry_run", "fetch"]
