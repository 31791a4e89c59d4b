"""edgetune: fine-tune small neural networks on the device where they are deployed."""
__version__ = "0.1.0"
