"""Learning from a stream on the device: OS-ELM, anomaly detection trained on normal data
only, and change detection to re-learn when the environment changes."""
from .detector import AnomalyDetector
from .drift import PageHinkley
from .oselm import OSELM

__all__ = ["AnomalyDetector", "OSELM", "PageHinkley"]
