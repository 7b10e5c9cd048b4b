"""The real-image folder and its contract: safe image loading, phantoms, imports, splits, inspection, licences.

What ``fetch``, ``phantoms`` and ``import`` write and what a user may bring (``images/`` + ``metadata.csv``, or a
``benign/``/``malignant/`` ImageFolder); ``split`` adds ``splits.csv``. Every stage reads real images through
here. ``docs/data.md`` describes the contract and every layout ``stda import`` reads.
"""
