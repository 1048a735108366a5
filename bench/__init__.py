"""`edgestad bench` and the EfficientAD-S peer it is timed against: outside the core package
(it imports export/ to make graphs), installed as ``edgestad.bench``."""
