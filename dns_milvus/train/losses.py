"""Training losses of the DnS paper: triplet (teacher), similarity regularisation, L1 distillation,
and the copy-label loss of dual learning (the students' exploration branch).

The similarity regularisation loss (ViSiL) is computed by the fine-grained networks' ``forward``
on the comparator output it constrains; it is re-exported here so every loss has one home.
"""

from __future__ import annotations

import torch

from dns_milvus.models import similarity_regularization

__all__ = [
    "TRIPLET_MARGIN",
    "copy_label_loss",
    "distillation_loss",
    "similarity_regularization",
    "triplet_loss",
]

#: Margin of the teacher's triplet loss (paper, section 4.3).
TRIPLET_MARGIN = 0.5


def triplet_loss(
    sim_pos: torch.Tensor, sim_neg: torch.Tensor, margin: float = TRIPLET_MARGIN
) -> torch.Tensor:
    """Mean hinge ``max(0, sim_neg - sim_pos + margin)``: a positive must beat the negative by ``margin``."""
    return torch.clamp(sim_neg - sim_pos + margin, min=0.0).mean()


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """L1 distance between the student's and the teacher's similarities of the same pairs."""
    return torch.nn.functional.l1_loss(student, teacher.to(student.dtype))


def copy_label_loss(
    student: torch.Tensor, copies: torch.Tensor, negative: float, positive: float = 1.0
) -> torch.Tensor:
    """Mean loss of similarities ``student`` against copy labels ``copies`` (bool, same shape).

    Two hinges: a copy is penalised below ``positive``, another pair above ``negative``. With
    ``positive`` 1, the top of every student's scale, the copies' part is the L1 distance to 1.
    Between the two margins the teacher's graded similarities are left alone, and a ``positive``
    below 1 does not drive copies into the fine students' Hardtanh ceiling, where they would tie.
    """
    copies = copies.to(device=student.device, dtype=torch.bool)
    per_pair = torch.where(copies, torch.relu(positive - student), torch.relu(student - negative))
    return per_pair.mean()
