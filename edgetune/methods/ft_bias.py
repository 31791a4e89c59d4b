"""`ft-bias`: Only the biases of every layer train."""
from .layerwise import LayerPlan, LayerwiseMethod


class FTBias(LayerwiseMethod):
    name = "ft-bias"
    description = "Only the biases of every layer train."
    trains_backbone = True

    @classmethod
    def plan(cls, n_layers: int) -> list[LayerPlan]:
        return [LayerPlan(bias=True) for _ in range(n_layers)]
