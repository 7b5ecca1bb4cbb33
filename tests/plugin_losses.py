"""A user-defined training loss loaded with --adv-training tests.plugin_losses:FGSMLoss (the plugin contract)."""
import torch
import torch.nn as nn
import torch.nn.functional as F

CALLS = {"forward": 0, "epochs": set()}


class FGSMLoss(nn.Module):
    """FGSM adversarial training: one signed-gradient step of size eps, no random start."""

    def __init__(self, attack_cfg, natural_criterion, dev_env=None, num_classes=None, eval_mode=True):
        super().__init__()
        self.cfg = attack_cfg
        self.criterion = natural_criterion

    def forward(self, model, x, y, epoch):
        CALLS["forward"] += 1
        CALLS["epochs"].add(epoch)
        model.eval()
        xr = x.detach().requires_grad_(True)
        g, = torch.autograd.grad(F.cross_entropy(model(xr), y), xr)
        x_adv = (x + self.cfg.eps * g.sign()).clamp(*self.cfg.boundaries).detach()
        model.train()
        adv_logits = model(x_adv)
        return self.criterion(adv_logits, y), None, adv_logits
