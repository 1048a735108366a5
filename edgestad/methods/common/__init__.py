"""Pieces several methods share: pretrained feature pyramids (``backbones.py``, ``resnet.py``),
their settings and checks, torch-free (``settings.py``: the config base of the pretrained-feature
methods), the anomaly-model base class with the letterbox mask and image-score rules
(``scoring.py``), the global branch (``global_score.py``), Perlin pseudo-anomalies
(``perlin.py``, numpy only), and the one staged, resumable training loop every method uses
(``training.py``) with its checkpoints (``checkpoint.py``)."""
