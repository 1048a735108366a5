"""edgestad: Student-Teacher visual anomaly detection, from training workstation to factory line."""
__version__ = "0.1.0"
