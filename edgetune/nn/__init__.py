"""The NumPy engine: activations, losses and the multi-layer perceptron backbone."""
from .activations import ACTIVATIONS, get_activation
from .losses import softmax, softmax_cross_entropy
from .mlp import Backbone

__all__ = ["ACTIVATIONS", "Backbone", "get_activation", "softmax", "softmax_cross_entropy"]
