"""``stda generate``: synthetic lesions by style transfer of benign training images with malignant styles.

``stage`` is the orchestration and the synthetic folder's contract (manifest, settings, resume, shards);
``engines`` runs either engine on one batch: ``nst`` (Gatys optimisation) or ``arbitrary`` (a pretrained
feed-forward network); ``quality`` is the gate that judges every result.
"""

from stda_hf.generate.arbitrary import load_models as load_arbitrary_models
from stda_hf.generate.stage import ENGINE_FILE, LEGACY_VALUES, GenerateConfig, QualityGateFailed, generate

__all__ = [
    "ENGINE_FILE",
    "LEGACY_VALUES",
    "GenerateConfig",
    "QualityGateFailed",
    "generate",
    "load_arbitrary_models",
]
