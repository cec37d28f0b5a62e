"""The task losses, each ``loss_fn(model, batch) -> (loss, metrics)``, as the training loop takes them.
Metrics are 0-dim tensors, left on the device: the loop reads them when it logs (reading a GPU
value makes the host wait for the GPU).

The output layer and cross-entropy are fused inside the model's ``forward(idx, targets=...)``
(see ``fused_ce``), so every wrapper that only sees ``forward`` (``torch.compile``, DDP,
FSDP, LoRA) computes the same loss.

    next-token (pretraining, instruction tuning: masked targets are IGNORE_INDEX)
    classification: cross-entropy of the class logits at each text's last token
    DPO: -log σ(β · ((log π(chosen) − log π_ref(chosen)) − (log π(rejected) − log π_ref(rejected))))
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .fused_ce import IGNORE_INDEX, cross_entropy_reference, linear_cross_entropy


def next_token_loss(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor],
                    fused: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The pretraining loss on a batch ``(x, y)``: predict y[t] (= x[t+1]) from x[:t+1].
    Instruction tuning uses it too, with the prompt and padding targets set to IGNORE_INDEX."""
    x, y = batch
    return model(x, targets=y, fused=fused), {}


def class_logits(model: torch.nn.Module, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(B, classes): the output at each text's last real token (right padding after it is never
    seen by that position under causal attention)."""
    logits = model(x)
    return logits[torch.arange(x.size(0), device=x.device), lengths - 1]


def classification_loss(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
                        ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Cross-entropy of the class logits; logs accuracy on the batch."""
    x, lengths, labels = batch
    logits = class_logits(model, x, lengths).float()
    loss = F.cross_entropy(logits, labels)
    return loss, {"accuracy": (logits.argmax(-1) == labels).float().mean().detach()}


def sequence_logprobs(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(B,): the sum of log p(y[t] | x[:t+1]) over the targets that are not IGNORE_INDEX."""
    logits = model(x).float()
    mask = y != IGNORE_INDEX
    logp = torch.log_softmax(logits, dim=-1).gather(-1, torch.where(mask, y, 0).unsqueeze(-1)).squeeze(-1)
    return (logp * mask).sum(-1)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Direct preference optimisation (Rafailov et al., 2023) from sequence log-probabilities.
    The rewards are β · (log π − log π_ref); the loss pushes the chosen one above the rejected one."""
    chosen_reward = beta * (policy_chosen - ref_chosen)
    rejected_reward = beta * (policy_rejected - ref_rejected)
    loss = -F.logsigmoid(chosen_reward - rejected_reward).mean()
    return loss, {"chosen_reward": chosen_reward.mean().detach(), "rejected_reward": rejected_reward.mean().detach(),
                  "reward_margin": (chosen_reward - rejected_reward).mean().detach()}


def preference_loss(beta: float):
    """A loss_fn for DPO batches ``(chosen_x, chosen_y, rejected_x, rejected_y, ref_chosen, ref_rejected)``:
    the reference model's log-probabilities come precomputed with the batch (they never change)."""
    def loss_fn(model: torch.nn.Module, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cx, cy, rx, ry, ref_c, ref_r = batch
        return dpo_loss(sequence_logprobs(model, cx, cy), sequence_logprobs(model, rx, ry), ref_c, ref_r, beta)
    return loss_fn


__all__ = ["IGNORE_INDEX", "class_logits", "classification_loss", "cross_entropy_reference", "dpo_loss",
           "linear_cross_entropy", "next_token_loss", "preference_loss", "sequence_logprobs"]
