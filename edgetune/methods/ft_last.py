"""`ft-last`: Only the last layer (weight and bias) trains."""
from .layerwise import LayerPlan, LayerwiseMethod


class FTLast(LayerwiseMethod):
    name = "ft-last"
    description = "Only the last layer (weight and bias) trains."
    trains_backbone = True

    @classmethod
    def plan(cls, n_layers: int) -> list[LayerPlan]:
        return [LayerPlan()] * (n_layers - 1) + [LayerPlan(weight=True, bias=True)]
