"""`lora-all`: A rank-R LoRA adapter beside every layer (W + s B A); backbone frozen."""
from .layerwise import LayerPlan, LayerwiseMethod


class LoRAAll(LayerwiseMethod):
    name = "lora-all"
    description = "A rank-R LoRA adapter beside every layer (W + s B A); backbone frozen."
    trains_backbone = False

    @classmethod
    def plan(cls, n_layers: int) -> list[LayerPlan]:
        return [LayerPlan(lora=True) for _ in range(n_layers)]
