"""STFPM with per-level U-Net auto-encoders after the student. See method.py."""
from .method import STFPMAE, STFPMAEConfig, STFPMAEMethod  # noqa: F401
