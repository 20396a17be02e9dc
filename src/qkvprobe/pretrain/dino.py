"""DINO-style self-distillation (Caron et al. 2021) for small grey images.

Student and EMA teacher (same timm ViT + projection head); the teacher's outputs are centred (running mean)
and sharpened (low temperature); multi-crop with 2 global 28 px crops and several local crops (12 px by
default, i.e. 3×3 patches of 4 px); cosine schedules for lr, weight decay and the EMA momentum. Our own
code, not ``lightly``'s, for the reason given in :mod:`qkvprobe.pretrain.common`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .augment import color_jitter, gaussian_blur, normalize, random_resized_crop, solarize, to_device
from .common import Objective, PretrainConfig, build_encoder


class DINOHead(nn.Module):
    """MLP → L2-normalised bottleneck → weight-normalised linear layer (norm fixed to 1) to ``out_dim``."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 1024, bottleneck_dim: int = 128) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, bottleneck_dim),
        )
        # Weight norm with g == 1 written out: normalising the rows at use avoids the deprecated
        # torch.nn.utils.weight_norm and its parametrisation keys in the state dict.
        self.last_weight = nn.Parameter(torch.randn(out_dim, bottleneck_dim) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, D] → [B, out_dim] logits."""
        z = F.normalize(self.mlp(x), dim=-1)
        return F.linear(z, F.normalize(self.last_weight, dim=-1))


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher ← m·teacher + (1 − m)·student, parameter by parameter (same order in both)."""
    t_params = list(teacher.parameters())
    s_params = list(student.parameters())
    torch._foreach_mul_(t_params, momentum)
    torch._foreach_add_(t_params, s_params, alpha=1.0 - momentum)


def dino_loss(
    student_out: torch.Tensor,
    teacher_out: torch.Tensor,
    center: torch.Tensor,
    num_global: int,
    student_temp: float,
    teacher_temp: float,
) -> torch.Tensor:
    """Cross-entropy between sharpened, centred teacher views and every *other* student view.

    ``student_out`` [V·B, K] (globals first), ``teacher_out`` [G·B, K] (globals only), ``center`` [K].
    """
    batch = teacher_out.shape[0] // num_global
    s = (student_out / student_temp).log_softmax(-1).split(batch)
    t = F.softmax((teacher_out - center) / teacher_temp, dim=-1).detach().chunk(num_global)
    total, pairs = student_out.new_zeros(()), 0
    for iq, tq in enumerate(t):
        for iv, sv in enumerate(s):
            if iv == iq:  # the same view on both sides carries no signal
                continue
            total = total + torch.sum(-tq * sv, dim=-1).mean()
            pairs += 1
    return total / pairs


class DINO(Objective):
    """Student/teacher pair, head, centre; ``step`` returns the DINO loss of one batch."""

    def __init__(self, cfg: PretrainConfig) -> None:
        self.cfg = cfg
        student_enc, _ = build_encoder(cfg.arch)
        dim = student_enc.embed_dim
        head = DINOHead(dim, cfg.out_dim)
        teacher_enc, _ = build_encoder(cfg.arch)
        teacher_head = DINOHead(dim, cfg.out_dim)
        teacher_enc.load_state_dict(student_enc.state_dict())
        teacher_head.load_state_dict(head.state_dict())
        # The exported encoder is the EMA teacher: it is the better feature extractor (DINO paper, §5.3).
        self.encoder = teacher_enc
        self.modules = nn.ModuleDict(
            {
                "student": nn.ModuleDict({"encoder": student_enc, "head": head}),
                "teacher": nn.ModuleDict({"encoder": teacher_enc, "head": teacher_head}),
            }
        )
        for p in self.modules["teacher"].parameters():
            p.requires_grad_(False)
        self.center = torch.zeros(cfg.out_dim)

    def parameters(self) -> list[nn.Parameter]:
        return list(self.modules["student"].parameters())

    def crops(self, x: torch.Tensor, gen: torch.Generator) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """2 global 28 px crops (blur p=1.0 / 0.1, solarise 0 / 0.2, as in DINO) + local crops, normalised."""
        g1 = gaussian_blur(color_jitter(random_resized_crop(x, 28, (0.4, 1.0), gen), gen), gen, p=1.0)
        g2 = random_resized_crop(x, 28, (0.4, 1.0), gen)
        g2 = solarize(gaussian_blur(color_jitter(g2, gen), gen, p=0.1), gen, p=0.2)
        local = None
        if self.cfg.num_local_crops:
            xs = x.repeat(self.cfg.num_local_crops, 1, 1, 1)
            local = gaussian_blur(
                color_jitter(random_resized_crop(xs, self.cfg.local_size, (0.1, 0.4), gen), gen), gen, p=0.5
            )
            local = normalize(local)
        return [normalize(g1), normalize(g2)], local

    def step(self, x: torch.Tensor, gen: torch.Generator, it: float, total: int) -> torch.Tensor:
        dev = next(self.encoder.parameters()).device
        glob, local = self.crops(to_device(x, dev), gen)
        g = torch.cat(glob)
        student, teacher = self.modules["student"], self.modules["teacher"]
        with torch.no_grad():
            t_out = teacher["head"](teacher["encoder"](g))
        s_out = student["head"](student["encoder"](g))
        if local is not None:
            s_out = torch.cat([s_out, student["head"](student["encoder"](local))])
        self.center = self.center.to(dev)
        loss = dino_loss(
            s_out.float(), t_out.float(), self.center, 2, self.cfg.student_temp, self.cfg.teacher_temp
        )
        with torch.no_grad():  # centre after the loss: the loss uses the centre of previous batches
            m = self.cfg.center_momentum
            self.center = self.center * m + t_out.float().mean(0) * (1 - m)
        return loss

    def after_step(self, it: float, total: int) -> None:
        # Momentum rises from cfg.momentum to 1 on a cosine; ``it`` is the step just taken.
        m = 1 - (1 - self.cfg.momentum) * (math.cos(math.pi * it / total) + 1) / 2
        ema_update(self.modules["teacher"], self.modules["student"], m)

    def extra_state(self) -> dict[str, torch.Tensor]:
        return {"center": self.center.detach().cpu()}

    def load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        self.center = state["center"].clone()
