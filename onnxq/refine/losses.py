"""What a unit's reconstruction minimises.

- mse: the unit's outputs against the float model's (BRECQ, QDrop).
- mae: the same in absolute error, robust to a few large activations (RepAPQ).
- pd: PD-Quant's prediction difference, KL(softmax(float logits / T) ‖ softmax(logits / T)) where
  the logits come from running the rest of the network in float on the unit's quantized
  outputs, plus λ·the outputs' MSE, which keeps a few hundred images from being over-fitted.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PD_TEMPERATURE = 4.0  # PD-Quant's T
PD_FEATURE_WEIGHT = 0.1  # PD-Quant's λ_r on the block-output MSE
LOSSES = ("mse", "mae", "pd")


def reconstruction(kind: str, outputs: list[torch.Tensor], targets: list[torch.Tensor]) -> torch.Tensor:
    """Squared (mse, pd) or absolute (mae) error summed over channels, averaged over samples and
    positions (BRECQ's lp_loss), summed over the unit's float outputs.

    Summing over channels puts the loss on the scale the rounding regulariser's weight (0.01 per
    weight, summed) was chosen for in AdaRound and BRECQ.
    """
    total = outputs[0].new_zeros(())
    for output, target in zip(outputs, targets, strict=True):
        if not output.is_floating_point():
            continue
        difference = (output - target).abs()
        power = difference if kind == "mae" else difference.pow(2)
        total = total + (power.sum(1).mean() if power.dim() > 1 else power.mean())
    return total


def prediction_difference(logits: torch.Tensor, reference: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(reference / T) ‖ softmax(logits / T)), averaged over samples."""
    target = F.log_softmax(reference / temperature, dim=-1)
    return F.kl_div(
        F.log_softmax(logits / temperature, dim=-1), target, log_target=True, reduction="batchmean"
    )
