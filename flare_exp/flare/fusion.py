"""Fusion functions phi(S, T) of FLARE (spec section 2).

S = A x_s (aligned to target positions) and T = A x_t, both batch x L x r. ``mask`` (batch x L,
1 for real target tokens) and ``causal`` matter only to the fusions that mix positions
(``matmul``, ``matmul_relu``, ``cross_attention``): padding never contributes, and in a causal
model position i only reads target positions j <= i, as it does at generation time.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

FUSIONS = ("add_relu", "add", "mul", "matmul", "matmul_relu", "cross_attention", "none")
# Fusions that mix target positions: they need every earlier target state at each step.
SEQUENCE_FUSIONS = ("matmul", "matmul_relu", "cross_attention")


def _masked(t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return t if mask is None else t * mask.unsqueeze(-1).to(t.dtype)


def _matmul(s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor | None, causal: bool) -> torch.Tensor:
    """S T^T T per example: position i gets S_i (sum_j T_j^T T_j) over the visible j."""
    t = _masked(t, mask)
    if not causal:
        return s @ (t.transpose(1, 2) @ t)
    # Running sum of outer products T_j^T T_j over j <= i (batch x L x r x r; r is small).
    gram = torch.cumsum(t.unsqueeze(-1) * t.unsqueeze(-2), dim=1)
    return torch.einsum("blr,blrs->bls", s, gram)


class Fusion(nn.Module):
    """phi(S, T) for the parameter-free fusions; ``name`` selects the function; ``unmasked``: the
    public code's matmul over every target position, padding and later positions included."""

    def __init__(self, name: str, unmasked: bool = False):
        super().__init__()
        if name not in FUSIONS:
            raise ValueError(f"Unknown fusion {name!r}; choose one of {FUSIONS}.")
        self.name = name
        self.unmasked = unmasked

    def forward(self, s, t, mask=None, causal=False):
        if self.unmasked:
            mask, causal = None, False
        if self.name == "add":
            return s + t
        if self.name == "add_relu":
            return F.relu(s) + F.relu(t)
        if self.name == "mul":
            return s * t
        if self.name == "matmul":
            return _matmul(s, t, mask, causal)
        if self.name == "matmul_relu":
            return _matmul(F.relu(s), F.relu(t), mask, causal)
        return t  # "none": plain LoRA on the target

    def extra_repr(self) -> str:
        return self.name


class CrossAttentionFusion(nn.Module):
    """softmax(Q(S) K(T)^T / sqrt(d_h)) V(T) with ``heads`` heads and own r x r projections.

    Q, K and V start as the identity so that the fusion begins as a well-scaled attention of
    the source over the target; they are trained with the adapter. ``official``: the public
    code's (layer.py, FuseCrossAttention): projections with bias and torch's default init, every
    target position attended (no padding or causal mask), ``dropout`` on the attention weights.
    """

    name = "cross_attention"

    def __init__(self, r: int, heads: int = 1, official: bool = False, dropout: float = 0.0):
        super().__init__()
        if r % heads:
            raise ValueError(f"cross_attention needs r ({r}) divisible by heads ({heads}).")
        self.heads = heads
        self.official = official
        self.q = nn.Linear(r, r, bias=official)
        self.k = nn.Linear(r, r, bias=official)
        self.v = nn.Linear(r, r, bias=official)
        self.dropout = nn.Dropout(dropout if official else 0.0)
        if not official:
            for proj in (self.q, self.k, self.v):
                nn.init.eye_(proj.weight)

    def forward(self, s, t, mask=None, causal=False):
        if self.official:
            mask, causal = None, False
        batch, length, r = t.shape
        d_h = r // self.heads

        def split(x):
            return x.view(batch, -1, self.heads, d_h).transpose(1, 2)

        q, k, v = split(self.q(s)), split(self.k(t)), split(self.v(t))
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(d_h)
        allowed = torch.ones(length, length, dtype=torch.bool, device=t.device)
        if causal:
            allowed = torch.tril(allowed)
        allowed = allowed.expand(batch, 1, length, length)
        if mask is not None:
            allowed = allowed & mask.bool()[:, None, None, :]
        # A row with nothing visible (a padding query in a causal model) attends to nothing.
        scores = scores.masked_fill(~allowed, float("-inf"))
        weights = self.dropout(torch.nan_to_num(torch.softmax(scores.float(), dim=-1)).to(v.dtype))
        return (weights @ v).transpose(1, 2).reshape(batch, length, r)

    def extra_repr(self) -> str:
        return f"heads={self.heads}"


def make_fusion(name: str, r: int, heads: int = 1, official: bool = False, dropout: float = 0.0) -> nn.Module:
    """The fusion ``name`` (``official``: the public code's layers, ``dropout`` its cross-attention's)."""
    if name == "cross_attention":
        return CrossAttentionFusion(r, heads, official, dropout)
    return Fusion(name, unmasked=official)


def attention_dropout(config) -> float:
    """The attention dropout the public code gives its cross-attention fusion (run.py): the
    decoders' attention_dropout, mT5's dropout_rate, XLM-R's attention_probs_dropout_prob."""
    for key in ("attention_dropout", "attention_probs_dropout_prob", "dropout_rate"):
        value = getattr(config, key, None)
        if isinstance(value, (int, float)):
            return float(value)
    return 0.0
