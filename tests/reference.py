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


def plain_meta_test_run(model: ANML, data, n_classes: int, lr: float, n_train: int = 15,
                        seed: int = 0) -> tuple[float, float, torch.nn.Linear]:
    """Meta-testing as the spec states it: the whole model, NM and RLN frozen, one Adam step on fc per drawing.

    Draws its randomness in the order of anml.meta_test_runs: the splits, then the fc weight.
    """
    from datasets import sample_meta_test

    generator = torch.Generator().manual_seed(seed)
    train_idx, test_idx = sample_meta_test(data, n_classes, n_train, generator)
    weight = torch.empty(model.fc.weight.shape)
    torch.nn.init.kaiming_normal_(weight, generator=generator)
    with torch.no_grad():
        model.fc.weight.copy_(weight)
    for p in [*model.rln.parameters(), *model.nm.parameters()]:
        p.requires_grad_(False)
    opt = torch.optim.Adam(model.fc.parameters(), lr=lr)
    for cls in train_idx:
        for i in cls:
            x, y = data.batch(i.view(1))
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()

    def accuracy(indices):
        with torch.no_grad():
            per_class = [(model(data.batch(c)[0]).argmax(1) == data.labels[c]).float().mean() for c in indices]
        return torch.stack(per_class).mean().item()
    return accuracy(test_idx), accuracy(train_idx), model.fc
