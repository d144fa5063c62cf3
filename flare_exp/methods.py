"""The methods of the paper's tables: the one registry that tables, planner, benchmark, pipeline
and tests derive from, and the only reader of ``cfg.method``. Imports no model library.

A method declares what it reads (the English version at training and at test, FLARE MT's
encoder), what stage 2 trains (its ``adapter``, built by ``flare_exp.adapters``; None: nothing),
its test inputs, its place and name in the tables, the throughput row the planner costs it by,
and the variants the benchmark measures. Its label (its name plus the settings that differ from
its config file's defaults) names its run directory.

Adding a method: a class registered here (in the tables' row order) and ``conf/method/<name>.yaml``
with ``name: <name>`` and its settings; a method whose stage 2 is a new kind of adapter also adds
its builder to ``flare_exp/adapters.py``.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from .data.formats import SEPARATOR, concatenate_inputs

CONF = Path(__file__).resolve().parent.parent / "conf" / "method"
METHODS: dict[str, type["Method"]] = {}  # in the paper's row order


def register(cls):
    """Add a method to the registry (after the others: the tables' row order). A method that trains
    declares the throughput row the planner costs it by, so that it is never costed as another."""
    if cls.adapter is not None and not any("cost_row" in vars(k) for k in cls.__mro__ if k is not Method):
        raise TypeError(f"Method {cls.name} trains an adapter: declare its cost_row (docs/throughput.csv).")
    METHODS[cls.name] = cls
    return cls


def method_for(method_cfg: DictConfig) -> "Method":
    """The method of a ``cfg.method`` config; an unknown name is refused in one sentence."""
    return method_class(method_cfg.name)(method_cfg)


def method_class(name: str) -> type["Method"]:
    if name not in METHODS:
        raise ValueError(f"Unknown method {name!r}; choose one of {list(METHODS)}.")
    return METHODS[name]


@lru_cache(maxsize=None)
def defaults(name: str) -> dict:
    """The settings of ``conf/method/<name>.yaml``: what a label leaves unsaid."""
    return OmegaConf.to_container(OmegaConf.load(CONF / f"{name}.yaml"))


class Method:
    """Zero-shot: the stage-1 model on the target test set."""

    name = "zero_shot"
    title = "zero-shot"            # its name in tables and plots
    adapter: str | None = None     # what stage 2 trains (flare_exp.adapters); None: nothing
    english_in_forward = False     # the model reads the English version in its forward
    test_input = "target"          # target | english (translate-test) | fused (English + target)
    cost_row = "lora"              # the throughput row (docs/throughput.csv) of its steps (an
    cost_measured = False          # evaluation-only method: LoRA's forward); whether it measures this method
    bench: tuple[tuple[str, dict], ...] = ()  # (benchmark name, method settings) it is measured in
    labelled: tuple[str, ...] = ()  # settings named in the label where they differ from the defaults

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg

    @property
    def trains(self) -> bool:
        """Stage 2 trains an adapter."""
        return self.adapter is not None

    @property
    def needs_mt_encoder(self) -> bool:
        """FLARE MT's frozen MT encoder reads the target text."""
        return self.adapter == "flare_mt"

    @property
    def reads_english_test(self) -> bool:
        """The method needs the English version of the test set (in its forward or as input)."""
        return self.english_in_forward or self.test_input in ("english", "fused")

    @property
    def translations(self) -> list[tuple[str, str]]:
        """The (split, direction) translations the method reads where the English is MT."""
        return [("train", "en-x"), ("validation", "en-x")] * self.trains + [("test", "x-en")] * self.reads_english_test

    @property
    def fusion(self) -> str | None:
        """FLARE's fusion function (``fusion``), None for the other methods."""
        return self.cfg.get("fusion") if self.adapter in ("flare", "flare_mt") else None

    @property
    def length_factor(self) -> int:
        return 2 if self.test_input == "fused" else 1

    @property
    def label(self) -> str:
        default = defaults(self.name)
        parts = [self.label_part(key, self.cfg.get(key)) for key in self.labelled
                 if self.cfg.get(key) != default.get(key)]
        return "-".join([self.name, *filter(None, parts)])

    def label_part(self, key: str, value) -> str | None:
        """How a setting that differs from its default appears in the label (None: not at all)."""
        return str(value)

    def check(self) -> None:
        """Refuse settings that cannot run (ValueError, one sentence), before any model loads."""

    def inputs(self, targets: list[dict], english: list[dict] | None, fields: list[str], qa: bool,
               separator: str = SEPARATOR):
        """(examples the batcher encodes, English examples the forward reads, or None); input fusion
        joins the English and the target text with ``separator``."""
        if self.test_input == "english":
            return english, None
        if self.test_input == "fused":
            return concatenate_inputs(targets, english, fields, qa, separator), None
        return targets, english if self.english_in_forward else None


@register
class ZeroShot(Method):
    pass


@register
class TranslateTest(Method):
    """The stage-1 model on the English translation of the target test set."""

    name = "translate_test"
    title = "translate-test"
    test_input = "english"


@register
class Lora(Method):
    """Translate-train: a fresh LoRA adapter on the target-language training data."""

    name = "lora"
    title = "LoRA"
    adapter = "lora"
    cost_row, cost_measured = "lora", True
    bench = (("lora", {}),)


@register
class XMixup(Method):
    """LoRA with X-Mixup at ``layers`` (``lambda0``, ``heads``); English read in the forward."""

    name = "xmixup"
    title = "X-Mixup"
    adapter = "xmixup"
    english_in_forward = True
    cost_row, cost_measured = "flare-add_relu", False  # an extra English forward, as FLARE's
    bench = (("xmixup", {}),)

    def check(self):
        if not 0 < float(self.cfg.lambda0) <= 1:
            raise ValueError(f"method.lambda0 must lie in (0, 1], got {self.cfg.lambda0}.")
        if int(self.cfg.heads) < 1:
            raise ValueError(f"method.heads must be a positive integer, got {self.cfg.heads}.")
        layers = self.cfg.layers
        if layers is not None and not all(isinstance(i, int) for i in ([layers] if isinstance(layers, int) else layers)):
            raise ValueError(f"method.layers must be layer indices (integers) or null, got {layers}.")


@register
class InputFusion(Method):
    """English and target text concatenated into one input (double length), plain LoRA."""

    name = "input_fusion"
    title = "input fusion"
    adapter = "lora"
    test_input = "fused"
    cost_row, cost_measured = "input_fusion", True
    bench = (("input_fusion", {}),)


FLARE_FUSIONS = ("add_relu", "add", "mul", "matmul", "matmul_relu", "cross_attention")  # benchmarked


@register
class FlareMT(Method):
    """FLARE MT: the frozen MT encoder (``encoder``) reads the target text; no English needed."""

    name = "flare_mt"
    title = "FLARE MT"
    adapter = "flare_mt"
    cost_row, cost_measured = "flare-add_relu", False  # the MT encoder's forward in the place of FLARE's
    bench = (("flare_mt", {"encoder": "tiny"}),)
    labelled = ("fusion", "heads", "alignment", "mask_source_padding")

    def label_part(self, key, value):
        if key == "heads":  # heads only matter to cross-attention
            return f"h{value}" if self.cfg.fusion == "cross_attention" else None
        return "unmasked" if key == "mask_source_padding" else str(value)


@register
class Flare(FlareMT):
    """FLARE (``fusion``, ``heads``, ``alignment``, ``mask_source_padding``)."""

    name = "flare"
    title = "FLARE"
    adapter = "flare"
    english_in_forward = True
    cost_measured = True
    bench = tuple((f"flare-{fusion}", {"fusion": fusion}) for fusion in FLARE_FUSIONS)


ORDER = tuple(METHODS)  # the paper's row order
TITLES = {name: cls.title for name, cls in METHODS.items()}
