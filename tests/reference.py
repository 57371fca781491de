"""Plain reference paths, written the obvious way the spec states them, to check the fast paths against."""
from __future__ import annotations

import higher
import torch
import torch.nn.functional as F

from model import ANML


def plain_meta_step(model: ANML, outer_opt: torch.optim.Optimizer,
                    traj_ims: torch.Tensor, traj_labels: torch.Tensor,
                    remember_ims: torch.Tensor, remember_labels: torch.Tensor,
                    inner_lr: float = 0.1) -> tuple[float, float]:
    """The whole ANML in `higher`'s differentiable copy, SGD over RLN + fc, NM recomputed at every step."""
    inner_opt = torch.optim.SGD([*model.rln.parameters(), *model.fc.parameters()], lr=inner_lr)
    with higher.innerloop_ctx(model, inner_opt, copy_initial_weights=False) as (fmodel, diffopt):
        for i in range(len(traj_ims)):
            diffopt.step(F.cross_entropy(fmodel(traj_ims[i:i + 1]), traj_labels[i:i + 1]))
        ims = torch.cat([traj_ims, remember_ims])
        labels = torch.cat([traj_labels, remember_labels])
        logits = fmodel(ims)
        loss = F.cross_entropy(logits, labels)
        loss.backward()
    outer_opt.step()
    outer_opt.zero_grad()
    return loss.item(), (logits.argmax(1) == labels).float().mean().item()
