"""A model whose answer is known by construction: "bright" when the mean pixel value (in
[0, 1]) is above one half, else "dark". It has no layer a CAM method could read."""

import torch
from torch import nn

LABELS = ["dark", "bright"]


class Brightness(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(1, 2)
        with torch.no_grad():  # logit(bright) - logit(dark) = 20 * mean - 10
            self.head.weight.copy_(torch.tensor([[-10.0], [10.0]]))
            self.head.bias.copy_(torch.tensor([5.0, -5.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x.mean(dim=(1, 2, 3)).unsqueeze(1))
