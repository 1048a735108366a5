"""RSTPM (Yamada, Kamiya, Hotta: "Reconstructed Student-Teacher and Discriminative Networks for
Anomaly Detection", 2022). See method.py."""
from .method import RSTPM, RSTPMConfig, RSTPMMethod  # noqa: F401
