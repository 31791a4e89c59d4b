"""int8 models for tiny memory budgets: post-training quantisation, the int8 forward pass,
an int8 skip-cache, and files. Training on the int8 graph (QAS) is the ``sparse`` method.

    qmodel = quantize(model, x_pretrain)          # per-channel int8 weights, calibrated scales
    qmodel.save("model-int8"); QuantBackbone.load("model-int8")
    FineTuner(qmodel, "skip2-lora").fit(x, y)     # adapters on the frozen int8 backbone
"""
from .cache import Int8SkipCache, attach_int8_cache
from .int8 import QuantBackbone, calibrate, load_any, quantize, quantize_weight

__all__ = ["Int8SkipCache", "QuantBackbone", "attach_int8_cache", "calibrate", "load_any", "quantize",
           "quantize_weight"]
