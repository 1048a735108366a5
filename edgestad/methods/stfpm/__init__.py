"""STFPM / STPM (Wang, Wu, Cui, Sun, Xu: "Student-Teacher Feature Pyramid Matching for Anomaly
Detection", BMVC 2021). See method.py."""
from .method import STFPM, STFPMConfig, STFPMMethod  # noqa: F401
