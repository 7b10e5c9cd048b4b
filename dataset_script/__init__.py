"""The ``datasets`` builder of stda/skin-lesions: the one place where the dataset's schema is declared."""

from .skin_lesions import (
    FEATURES,
    SPLIT_ORDER,
    SkinLesions,
    SkinLesionsConfig,
    Sources,
    load_sources,
    split_examples,
    verdict_of,
)

__all__ = [
    "FEATURES", "SPLIT_ORDER", "SkinLesions", "SkinLesionsConfig", "Sources", "load_sources", "split_examples",
    "verdict_of",
]  # fmt: skip
