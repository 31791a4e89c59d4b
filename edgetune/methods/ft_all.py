"""`ft-all`: Every weight and bias trains (full fine-tuning)."""
from .layerwise import LayerPlan, LayerwiseMethod


class FTAll(LayerwiseMethod):
    name = "ft-all"
    description = "Every weight and bias trains (full fine-tuning)."
    trains_backbone = True

    @classmethod
    def plan(cls, n_layers: int) -> list[LayerPlan]:
        return [LayerPlan(weight=True, bias=True) for _ in range(n_layers)]
