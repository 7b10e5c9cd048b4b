"""The real-image folder and its contract: safe image loading, phantoms, splits, inspection, licences.

What ``fetch`` and ``phantoms`` write and what a user may bring (``images/`` + ``metadata.csv``, or a
``benign/``/``malignant/`` ImageFolder); ``split`` adds ``splits.csv``. Every stage reads real images through here.
"""
