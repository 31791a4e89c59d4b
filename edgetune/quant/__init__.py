"""int8 models for tiny memory budgets: post-training quantisation of MLPs and CNNs, the int8
forward pass (NumPy here, the compiled engine's in ``edgetune.quant.native``, bit for bit the
same), an int8 skip-cache, and files. Training on the int8 graph (QAS) is the ``sparse``
method (int8 MLPs).

    qmodel = quantize(model, x_pretrain)          # per-channel int8 weights, calibrated scales
    qmodel.is_int8                                # True: an ordinary Backbone with int8 layers
    qmodel.save("model-int8"); Backbone.load("model-int8")
    FineTuner(qmodel, "skip2-lora").fit(x, y)     # adapters on the frozen int8 backbone
"""
from .cache import Int8SkipCache, attach_int8_cache
from .int8 import calibrate, dequantize, int8_backbone, load_any, quantize, quantize_weight

__all__ = ["Int8SkipCache", "attach_int8_cache", "calibrate", "dequantize", "int8_backbone", "load_any",
           "quantize", "quantize_weight"]
