"""FlareConfig: the LoRA settings plus where and how FLARE fuses."""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from .alignment import ANCHORS, STRATEGIES
from .fusion import FUSIONS

# Query/value projection names per architecture family, in the order they are tried.
QUERY_VALUE_NAMES = (("q_proj", "v_proj"), ("query", "value"), ("q", "v"))


@dataclass
class FlareConfig:
    """Settings of a FLARE adapter.

    Attributes:
        r, alpha, dropout: LoRA rank, alpha (scale s = alpha / r) and dropout on the input of A
            (applied to x_t and x_s alike).
        target_modules: LoRA targets: module names (suffix match, as in PEFT), a regex string
            (full match), or "all-linear". None: the fused modules only.
        fuse_modules: the targets whose adapter fuses source and target, same forms as
            ``target_modules``. None: the attention query and value projections (q_proj/v_proj,
            query/value, or q/v; for encoder-decoder models those of the encoder only).
        fusion: phi, one of ``FUSIONS``; ``heads`` is used by ``cross_attention``.
        alignment: ``position`` or ``proportional`` (spec D5).
        anchor: ``start`` or ``end`` of the prompt for ``position``; None: ``end`` for decoder-only
            (causal) models, ``start`` otherwise.
        mask_source_padding: False reproduces the public code (spec D6), which pads both sides
            to one width and fuses position i with position i, padding included: both sides
            are placed as if padded to one common width on their own padding side (see
            ``build_source_index``).
        modules_to_save: extra modules trained in full with the adapter (PEFT semantics).
        adapter_name: the name of the FLARE adapter inside the PEFT model.
        source_train_mode: False: the source pass runs in eval mode (no dropout); True: in the
            model's own mode, dropout active while training (the public code's).
        checkpointed_fusion: True: a layer under gradient checkpointing fuses as any other (spec
            D3); False: it runs its adapters as plain LoRA while training, fusing only at
            evaluation (the public code's, which passes no source into checkpointed layers).
            Where every fused layer is checkpointed, a training forward skips the source pass,
            whose result no layer would read (the public code runs it and discards it).
        official_fusion_layer: False: cross-attention without bias, starting as the identity,
            masked (padding; causal models: later positions), no dropout, matmul masked alike
            (the spec's); True: the public code's layer.py: query, key and value with bias and
            torch's default init, no mask, the model's attention dropout; matmul unmasked.
    """

    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    target_modules: list[str] | str | None = None
    fuse_modules: list[str] | str | None = None
    fusion: str = "add_relu"
    heads: int = 1
    alignment: str = "position"
    anchor: str | None = None
    mask_source_padding: bool = True
    modules_to_save: list[str] | None = None
    adapter_name: str = "flare"
    source_train_mode: bool = False
    checkpointed_fusion: bool = True
    official_fusion_layer: bool = False

    def __post_init__(self):
        if self.fusion not in FUSIONS:
            raise ValueError(f"Unknown fusion {self.fusion!r}; choose one of {FUSIONS}.")
        if self.alignment not in STRATEGIES:
            raise ValueError(f"Unknown alignment {self.alignment!r}; choose one of {STRATEGIES}.")
        if self.anchor is not None and self.anchor not in ANCHORS:
            raise ValueError(f"Unknown anchor {self.anchor!r}; choose one of {ANCHORS} or None.")
        if self.r <= 0:
            raise ValueError(f"r must be a positive integer, got {self.r}.")
        for name in ("target_modules", "fuse_modules", "modules_to_save"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                setattr(self, name, list(value))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, directory: str | Path) -> None:
        path = Path(directory) / "flare_config.json"
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> "FlareConfig":
        path = Path(directory) / "flare_config.json"
        if not path.is_file():
            raise FileNotFoundError(f"No FLARE adapter in {directory}: {path.name} is missing.")
        data = json.loads(path.read_text())
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{path} has unknown FlareConfig fields {unknown}.")
        return cls(**data)


def matches(name: str, pattern: list[str] | str) -> bool:
    """PEFT's matching rule: a string is a full regex match, a list matches name suffixes."""
    if isinstance(pattern, str):
        return re.fullmatch(pattern, name) is not None
    return any(name == p or name.endswith("." + p) for p in pattern)


def _linear_names(model: nn.Module) -> list[str]:
    names = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) or type(module).__name__ in ("Linear4bit", "Linear8bitLt"):
            names.append(name)
    return names


def resolve_fuse_modules(model: nn.Module, config: FlareConfig) -> list[str]:
    """Full names of the modules that fuse, resolved against ``model``."""
    linear = _linear_names(model)
    if config.fuse_modules is not None:
        fused = [n for n in linear if matches(n, config.fuse_modules)]
        if not fused:
            raise ValueError(f"fuse_modules={config.fuse_modules!r} matches no linear module of the model.")
        return fused
    encoder_prefix = None
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        encoder = model.get_encoder()
        encoder_prefix = next(n for n, m in model.named_modules() if m is encoder)
    for pair in QUERY_VALUE_NAMES:
        fused = [n for n in linear if n.rsplit(".", 1)[-1] in pair]
        if encoder_prefix is not None:
            fused = [n for n in fused if n.startswith(encoder_prefix + ".")]
        if fused:
            return fused
    raise ValueError(
        "Could not find attention query/value projections (q_proj/v_proj, query/value, q/v); "
        "set fuse_modules to the names of the projections that should fuse."
    )
