"""`lora-last`: A rank-R LoRA adapter beside the last layer only; backbone frozen."""
from .layerwise import LayerPlan, LayerwiseMethod


class LoRALast(LayerwiseMethod):
    name = "lora-last"
    description = "A rank-R LoRA adapter beside the last layer only; backbone frozen."
    trains_backbone = False

    @classmethod
    def plan(cls, n_layers: int) -> list[LayerPlan]:
        return [LayerPlan()] * (n_layers - 1) + [LayerPlan(lora=True)]
