"""A run set up once from its config: every check before any model loads, the method, paths,
device, tokenizer, translator and batchers, each split read and checked once, and the model
assembled in one place (stage 1, FLARE MT's encoder, the method's adapter). The stages
(``flare_exp.stages``) are short recipes over it; nothing below it sees the root config.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from . import adapters, record
from .access import preflight
from .data.collate import Batcher
from .data.formats import SEPARATOR, fuse_in_template, with_english
from .data.qa import OneWindowBatcher, SpanBatcher
from .errors import ConfigError
from .settings import check_settings
from .evaluate import decoding, predict, score
from .flare.mt import load_mt_encoder
from .methods import method_for
from .models import load_base_model, load_tokenizer, pick_device, save_once
from .pairs import Examples, LazyTranslator, Pairs
from .protocol import (OFFICIAL_QA_FUSED_PROMPTS, applies, checkpointing, family, input_length, official_scoring,
                       official_segment, official_separator, quotes_test, quotes_train, translations)
from .stage1 import ensure_stage1, load_stage1
from .train import Checkpoint, Validation, train_model
from .translate import build_tiny_nllb, nllb_code

log = logging.getLogger(__name__)

STAGES = ("run", "translate", "stage1", "stage2", "evaluate")


def _choices(group: str) -> list[str]:
    folder = Path(__file__).resolve().parent.parent / "conf" / group
    return sorted(p.stem for p in folder.glob("*.yaml"))


def check(cfg: DictConfig, access: bool = True) -> None:
    """Refuse, in one sentence, a combination that cannot run, before any model loads (``access``:
    also one that needs the hub where it cannot be reached)."""
    task, lang, model, mt = cfg.task, cfg.lang, cfg.model, cfg.mt
    if cfg.stage not in STAGES:
        raise ConfigError(f"Unknown stage {cfg.stage!r}; choose one of {list(STAGES)}.")
    try:
        method = method_for(cfg.method)
        check_settings(cfg, method)
        adapters.check(method, model, cfg.train)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if cfg.source.mode != "as_trained" and cfg.stage != "evaluate":
        raise ConfigError(f"source.mode={cfg.source.mode} re-evaluates a finished run: add stage=evaluate.")
    if cfg.stage == "evaluate" and not method.reads_english_test:
        raise ConfigError(f"Method {method.name} reads no English at test: stage=evaluate with another source "
                          "applies to flare, input_fusion, xmixup and translate_test.")
    if lang.code not in task.languages:
        raise ConfigError(f"Task {task.name} has no language {lang.code!r}; choose lang from {list(task.languages)}.")
    if task.type not in ("classification", "qa"):
        raise ConfigError(f"Unknown task type {task.type!r} (classification or qa).")
    if mt.name == "gold" and not task.parallel and translations(cfg.protocol, task, method):
        why = "" if method.translations else " to filter its test set (protocol.qa_test_set=markers_kept)"
        raise ConfigError(
            f"Task {task.name} is not parallel, so method {method.name} needs machine translation{why}: "
            f"choose mt from {[m for m in _choices('mt') if m != 'gold']}."
        )
    if model.kind not in ("encoder", "decoder", "encoder_decoder"):
        raise ConfigError(f"Model {model.name} of kind {model.kind!r} cannot run yet; choose model from "
                          f"{_choices('model')}.")
    expected_format = "head" if model.kind == "encoder" else "plain"
    if model.get("prompt_format", expected_format) != expected_format:
        raise ConfigError(f"Model {model.name} ({model.kind}) supports prompt_format={expected_format} only.")
    if access:
        preflight([cfg])


@dataclass
class MTEncoder:
    """FLARE MT's frozen MT encoder, its tokenizer and its width."""

    model: torch.nn.Module
    tokenizer: object
    width: int


class Setup:
    """One run (task, model, method, language, seed), set up from ``cfg``: ``check`` runs here
    (``access=False``: not whether the hub can be reached); what loads a model (tokenizer,
    translator, stage 1, the MT encoder) loads on first use."""

    def __init__(self, cfg: DictConfig, access: bool = True):
        check(cfg, access)
        self.cfg = cfg
        self.method = method_for(cfg.method)
        self.task, self.lang, self.model_cfg = cfg.task, cfg.lang, cfg.model
        self.seed = int(cfg.seed)
        self.out = record.run_dir(cfg)
        self.stage1_path = record.stage1_dir(cfg)
        self.cache_dir = Path(cfg.output_dir) / "cache"
        self.quotes = quotes_train(cfg.protocol, cfg.task)
        self.examples = Examples(cfg.task, cfg.data, strip_quotes=self.quotes)
        self.gold = cfg.mt.name == "gold"
        self.protocol = cfg.protocol
        self._stage1 = None  # a stage 1 trained by this run, kept in memory

    # -- the protocol's settings (conf/protocol/, docs/protocol.md) -------------------------
    @property
    def max_new_tokens(self) -> int:
        """The generation budget: ``protocol.max_new_tokens``, or the task's."""
        return int(self.protocol.max_new_tokens or self.task.max_new_tokens)

    @property
    def tests_target_text(self) -> bool:
        """The official code's bug (``protocol.nusax_translate_test: target``): NusaX translate-test
        never assigns its translated test set, so it tests the target text."""
        return self.protocol.nusax_translate_test == "target" and self.task.name == "nusax"

    @property
    def loads_stage1(self) -> bool:
        """False where the official code's bug applies (``protocol.qa_decoder_stage1: not_loaded``:
        a decoder's TyDiQA stage 2 starts from the base model)."""
        return not (self.protocol.qa_decoder_stage1 == "not_loaded" and self.task.type == "qa"
                    and self.model_cfg.kind == "decoder")

    def settings(self, group: str) -> DictConfig:
        """``cfg.stage1`` or ``cfg.train`` as training reads them: with the protocol's schedule and,
        under ``protocol.kbit_gradient_checkpointing``, gradient checkpointing on a 4-bit model."""
        settings = OmegaConf.create({**OmegaConf.to_container(self.cfg[group], resolve=True),
                                     "schedule": self.protocol.schedule})  # resolved: interpolations read the root
        settings.gradient_checkpointing = checkpointing(self.protocol, self.model_cfg, settings)
        return settings

    # -- what the run reads --------------------------------------------------------------
    @cached_property
    def identity(self) -> dict:
        return record.run_identity(self.cfg)

    @cached_property
    def device(self) -> torch.device:
        return pick_device(self.cfg.device)

    @cached_property
    def tokenizer(self):
        tokenizer = load_tokenizer(self.model_cfg, self.cache_dir)
        if self._new_pad_token:
            tokenizer.add_special_tokens({"pad_token": "<pad>"})
        return tokenizer

    @property
    def _new_pad_token(self) -> bool:
        """Whether a Llama gets a new pad token, its embeddings resized (``protocol.llama_pad_token``)."""
        return self.protocol.llama_pad_token == "new_token" and family(self.model_cfg) == "llama"

    @property
    def flare_options(self) -> dict:
        """The protocol's FLARE settings (``flare_exp.flare.FlareConfig``): the source pass's mode
        (``protocol.source_pass``), whether checkpointed layers fuse while training (unless
        ``protocol.checkpointed_fusion: dropped`` in a run it applies to: a 4-bit decoder's FLARE,
        as in the official code) and the official fusion layers (``protocol.fusion_layer``)."""
        dropped = self.protocol.checkpointed_fusion == "dropped" and applies(
            "checkpointed_fusion", self.task, self.model_cfg, self.method)
        return {"source_train_mode": self.protocol.source_pass == "train", "checkpointed_fusion": not dropped,
                "official_fusion_layer": self.protocol.fusion_layer == "default_unmasked"}

    def trained_base(self, model) -> list:
        """The base model's own parameters the protocol trains in both stages, ``model`` a stage-1
        model: a decoder's LM head (``protocol.decoder_lm_head``; Gemma 2's, tied, is its embedding
        matrix) and a Llama's input embeddings (``protocol.llama_pad_token``)."""
        modules = []
        if self.protocol.decoder_lm_head == "trained" and self.model_cfg.kind == "decoder":
            modules.append(model.get_output_embeddings())
        if self._new_pad_token:
            modules.append(model.get_input_embeddings())
        return list({id(p): p for m in modules for p in m.parameters()}.values())

    @cached_property
    def translator(self) -> LazyTranslator | None:
        """The MT system (loaded when a cache lacks a translation); None under ``mt=gold``."""
        if self.gold:
            return None
        return LazyTranslator(self.cfg.mt, record.translator_name(self.cfg), record.translation_max_length(self.cfg),
                              self.device, self.protocol.mt_dtype)

    @cached_property
    def pairs(self) -> Pairs:
        return Pairs(self.examples, self.lang, self.translator,
                     lambda split, direction: record.translation_cache(self.cfg, split, direction), quotes=self.quotes)

    @property
    def english_gold(self) -> bool:
        """Translate-test QA scored against the English answer the official code's marks find
        (``protocol.qa_translate_test_gold: english_markers``), not against the target's gold
        through answers translated back."""
        return (self.task.type == "qa" and self.method.test_input == "english"
                and self.protocol.qa_translate_test_gold == "english_markers")

    def test_data(self) -> tuple[list[dict], list[dict] | None, dict]:
        """(the target test set, its English version or None where the method reads none, what the
        protocol's filter dropped: ``protocol.qa_test_set: markers_kept``, TyDiQA's test set as the
        official code filters it, the items whose translation into English lost the marks of the
        answer)."""
        reads = self.method.reads_english_test
        if self.translator is None or not quotes_test(self.protocol, self.task, self.method):
            test, english = self.pairs.test(english=reads)
            return test, english, {}
        test, english, counts = self.pairs.quoted_test(self.english_gold, self.protocol.qa_test_set == "markers_kept",
                                                       drop_empty=self.method.test_input == "english")
        return test, english if reads else None, {"test_set": counts}

    def check_data(self) -> dict[str, int]:
        """Read and check every split the run reads, before any model loads (they stay read);
        the counts of empty texts."""
        lang, trains = self.lang.code, self.method.trains
        validates = trains and self.cfg.train.get("eval_every") != 0
        reads = [("en", "train"), ("en", "test"), (lang, "test")]  # stage 1, its English test, the test
        if validates or self.cfg.stage1.get("eval_every") != 0:  # stage 1 selects on English validation too
            reads.append(("en", "validation"))
        if self.gold:
            reads += [(lang, "train")] * trains + [(lang, "validation")] * validates
        return self.examples.check(reads, lang, self.gold, self.cfg.data.get("empty_texts", "warn"))

    def missing_inputs(self) -> str | None:
        """``stage=stage2``: what of the cached stage 1 and the translations the run reads is not
        there yet (one sentence naming the stage to run), or None."""
        chained = "(python -m flare_exp.sweep chains the stages)"
        if not (self.stage1_path / record.STAGE1_RECORD).is_file():
            return (f"Stage 1 of {self.task.name} {self.model_cfg.name} seed {self.seed} is not in {self.stage1_path}: "
                    f"run stage=stage1 first {chained}.")
        if self.gold:
            return None
        for split, direction in translations(self.protocol, self.task, self.method):
            missing = self.pairs.missing(split, direction)
            if missing:
                return (f"{missing} {direction} translations of {self.task.name} {split} ({self.lang.code}) are "
                        f"not in the cache: run stage=translate first {chained}.")
        return None

    # -- batches -------------------------------------------------------------------------
    @property
    def max_length(self) -> int:
        """The token budget of an input: ``protocol.max_length``, or the task's (doubled by input
        fusion, ``make_batcher``)."""
        return input_length(self.protocol, self.task)

    def make_batcher(self, plain: bool = False):
        """The batcher of this run's method (``plain``: of stage 1, whatever the method)."""
        factor = 1 if plain else self.method.length_factor
        max_length = int(self.max_length * factor)
        limit = int(self.tokenizer.model_max_length)
        if max_length > limit:  # XLM-R's 512 positions under input fusion's doubled TyDiQA length
            log.warning("%s reads at most %d tokens: %s's inputs of %d tokens are cut to %d (QA: more windows).",
                        self.model_cfg.name, limit, self.method.label, max_length, limit)
            max_length = limit
        mt_tokenizer = self.mt_encoder.tokenizer if not plain and self.method.needs_mt_encoder else None
        mt_lang = nllb_code(self.lang) if mt_tokenizer is not None else None
        official = self.protocol.truncation_side == "left"  # the official code's cuts, right in stage 1
        side = "right" if plain else self.protocol.truncation_side
        formatted = self.protocol.input_format == "concatenated"  # the official code's formats
        fused = formatted and not plain and self.method.test_input == "fused"
        if self.task.type == "qa" and self.model_cfg.kind == "encoder":
            if self.protocol.qa_windows == "one":
                return OneWindowBatcher(self.tokenizer, max_length, side,
                                        token_index=self.protocol.qa_encoder_score == "token_index",
                                        mt_tokenizer=mt_tokenizer, mt_lang=mt_lang, fuse=fused,
                                        mt_joiner="" if formatted else "\n")
            return SpanBatcher(self.tokenizer, max_length, stride=self.task.get("stride", 128),
                               mt_tokenizer=mt_tokenizer, mt_lang=mt_lang)
        return Batcher(self.tokenizer, self.task, self.model_cfg.kind, max_length, mt_tokenizer=mt_tokenizer,
                       mt_lang=mt_lang, truncation_side=side, official_cut=official,
                       segment=official_segment(self.task, self.model_cfg) if formatted else None, mt_prompt=formatted,
                       scoring=official_scoring(self.protocol, self.task, self.model_cfg),
                       prompt_eos=not plain and self.protocol.gemma_eos and family(self.model_cfg) == "gemma",
                       prompt=OFFICIAL_QA_FUSED_PROMPTS[self.task.name] if fused and self.task.type == "qa" else None)

    @cached_property
    def batcher(self):
        return self.make_batcher()

    @cached_property
    def stage1_batcher(self):
        return self.make_batcher(plain=True)

    # -- models --------------------------------------------------------------------------
    def base_model(self, stage1: bool = False):
        """The base model (``stage1``: as stage 1 trains it, in ``protocol.stage1_compute_dtype``; a
        4-bit decoder's weights that are not quantised in ``protocol.unquantised_dtype``)."""
        labels = list(self.task.labels) if self.task.labels else None
        model_cfg, overrides = self.model_cfg, {}
        if stage1 and self._stage1_compute_dtype:
            overrides["compute_dtype"] = self._stage1_compute_dtype
        if self.protocol.unquantised_dtype and applies("unquantised_dtype", self.task, self.model_cfg, self.method):
            overrides["unquantised_dtype"] = self.protocol.unquantised_dtype
        if overrides:
            model_cfg = OmegaConf.create({**OmegaConf.to_container(model_cfg, resolve=True), **overrides})
        model = load_base_model(model_cfg, self.tokenizer, labels, self.device, self.cache_dir, self.seed)
        if self._new_pad_token and model.get_input_embeddings().num_embeddings < len(self.tokenizer):
            torch.manual_seed(self.seed)  # the new rows are drawn around the old ones' mean (transformers)
            model.resize_token_embeddings(len(self.tokenizer))
            for param in model.parameters():
                param.requires_grad_(False)
        return model

    @property
    def _stage1_compute_dtype(self) -> str | None:
        """Stage 1's NF4 compute dtype where the protocol sets one other than stage 2's."""
        dtype = self.protocol.stage1_compute_dtype
        return dtype if self.model_cfg.quantization == "nf4" and dtype not in (None, self.model_cfg.dtype) else None

    @cached_property
    def mt_encoder(self) -> MTEncoder | None:
        """FLARE MT's encoder (``method.encoder``; ``tiny`` builds a random one offline), or None."""
        if not self.method.needs_mt_encoder:
            return None
        path = self.method.cfg.encoder
        if path == "tiny":
            path = str(save_once(self.cache_dir / "models" / "tiny-nllb", build_tiny_nllb))
        return MTEncoder(*load_mt_encoder(path, self.device, self.protocol.mt_dtype))

    def ensure_stage1(self) -> Path:
        """The stage-1 adapter's folder, trained now (and kept in memory) unless cached."""
        trained = ensure_stage1(self.stage1_path, self._train_stage1)
        if trained is not None and not self._stage1_compute_dtype:  # else stage 2 loads it in its own dtype
            self._stage1 = trained
        return self.stage1_path

    def stage1(self):
        """The stage-1 model: trained now unless cached, loaded from the cache unless this run just
        trained it. Where the protocol does not load it (``loads_stage1``), the base model with a
        stage-1 adapter as initialised, which computes nothing (the official code's)."""
        self.ensure_stage1()
        model, self._stage1 = self._stage1, None  # the next caller builds its own
        if not self.loads_stage1:
            from peft import get_peft_model

            torch.manual_seed(self.seed)
            untrained = get_peft_model(self.base_model(), adapters.lora_config(self.model_cfg, self.cfg.stage1))
            for param in untrained.parameters():
                param.requires_grad_(False)
            return untrained.eval()
        return model if model is not None else load_stage1(self.base_model(), self.stage1_path)

    def _train_stage1(self):
        from peft import get_peft_model

        from . import distributed

        settings = self.settings("stage1")
        english_train = self.examples("en", "train")
        base = self.base_model(stage1=True)
        torch.manual_seed(self.seed)
        model = get_peft_model(base, adapters.lora_config(self.model_cfg, settings,
                                                          adapters.task_head(self.model_cfg, self.task)))
        for param in self.trained_base(model):
            param.requires_grad_(True)
        resume = Checkpoint(self.stage1_path.with_name(f".{self.stage1_path.name}.checkpoint"),
                            int(settings.checkpoint_every))
        stats = train_model(model, self.stage1_batcher, english_train, None, settings, self.seed, self.device,
                            desc=f"stage 1 {self.task.name} en", checkpoint=resume,
                            validation=self._validation(model, self.stage1_batcher, settings,
                                                        self.examples("en", "validation"), None, "stage 1 validation en"))
        if distributed.world()[1] != 0:
            return model, None

        def record_of() -> dict:
            rows = self._predict(model, self.stage1_batcher, self.examples("en", "test"), None,
                                 "stage 1 English test", settings.get("autocast"))
            return {"train": stats, "english_test": score(rows, self.stage1_batcher),
                    "key": record.stage1_key(self.cfg)}

        return model, record_of

    def model(self):
        """The model this run trains and tests: stage 1, with the method's adapter on it (and
        FLARE MT's encoder)."""
        stage1 = self.stage1()
        trained = self.trained_base(stage1) if self.method.adapter is not None else []
        model = adapters.build(self.method, stage1, self.model_cfg, self.cfg.train, self.seed,
                               adapters.stage2_head(self.model_cfg, self.task), self.mt_encoder, self.flare_options)
        for param in trained:  # trained again in stage 2 (the official code's run.py)
            param.requires_grad_(True)
        return model

    # -- training and testing --------------------------------------------------------------
    def _inputs(self, targets, english):
        """(what the batcher encodes, the English the forward reads) of the method; input fusion
        joins the two texts as ``protocol.input_format`` says."""
        fields = list(self.task.fields)
        official = self.protocol.input_format == "concatenated" and self.method.test_input == "fused"
        if official and self.batcher.qa:  # an encoder's one window fuses the two itself, a decoder's prompt names both
            return (targets, english) if self.model_cfg.kind == "encoder" else (with_english(targets, english, fields), None)
        if official and len(fields) == 2:
            template = official_segment(self.task, self.model_cfg) or self.task.prompt
            return fuse_in_template(targets, english, template, *fields), None
        return self.method.inputs(targets, english, fields, self.batcher.qa,
                                  separator=official_separator(self.task, self.model_cfg) if official else SEPARATOR)

    def predict(self, model, targets, english, desc: str) -> list[dict]:
        inputs, english = self._inputs(targets, english)
        if self.method.test_input == "english" and self.tests_target_text:
            inputs = targets
        return self._predict(model, self.batcher, inputs, english, f"{desc} {self.method.label} {self.lang.code}",
                             self.cfg.train.get("autocast"))

    def _predict(self, model, batcher, examples, english, desc: str, precision: str | None) -> list[dict]:
        """``flare_exp.evaluate.predict`` with this run's batch size, device and generation."""
        return predict(model, batcher, examples, english, self.cfg.train.eval_batch_size, self.device,
                       self.max_new_tokens, desc=desc, precision=precision, generation=self.protocol.generation)

    def validation(self, model) -> Validation | None:
        """Model selection on the target validation data (human under ``mt=gold``, else translated
        like the training data), scored by the task's metric; None with ``train.eval_every=0``."""
        if self.cfg.train.get("eval_every") == 0:
            return None
        targets, english, _ = self.pairs.training("validation")
        inputs, english = self._inputs(targets, english)
        return self._validation(model, self.batcher, self.settings("train"), inputs, english,
                                f"validation {self.method.label} {self.lang.code}", self.task.get("select", "best"))

    def _validation(self, model, batcher, settings, examples, english, desc: str,
                    select: str | None = None) -> Validation | None:
        """Validation of ``model`` on ``examples`` every ``settings.eval_every`` steps (None: a tenth of
        training; 0: none), scored by the task's metric; ``select`` (default ``settings.select``)."""
        if settings.get("eval_every") == 0:
            return None

        def validate() -> float:
            rows = self._predict(model, batcher, examples, english, desc, settings.get("autocast"))
            return score(rows, batcher)[self.task.metric]

        return Validation(validate, settings.get("eval_every"), select or settings.get("select", "best"))

    def train(self, model, log=None) -> tuple[dict, dict]:
        """Stage 2 on the method's training data: (training statistics, what the data dropped)."""
        targets, english, info = self.pairs.training()
        inputs, english = self._inputs(targets, english)
        stats = train_model(model, self.batcher, inputs, english, self.settings("train"), self.seed, self.device,
                            desc=f"stage 2 {self.method.label} {self.lang.code}",
                            checkpoint=Checkpoint(self.out / "checkpoint", int(self.cfg.train.checkpoint_every)),
                            validation=self.validation(model), log=log)
        return stats, info

    def test(self, model, test, english, out: Path) -> tuple[list[dict], dict, dict]:
        """(prediction rows, metrics, further labelled metrics) on the test set."""
        rows = self.predict(model, test, english, "test")
        for row, target in zip(rows, test):
            row["id"] = target["id"]
        extra = {}
        if self.batcher.kind != "encoder":  # a generating model: how it decoded
            extra["decoding"] = decoding(model, self.protocol.generation)
            if extra["decoding"]["do_sample"]:
                print(f"Note: {self.model_cfg.name}'s generation config samples ({extra['decoding']}), so the "
                      "scores vary with the seed; protocol.generation=greedy decodes greedily.", flush=True)
        if self.batcher.qa and self.method.test_input == "english" and self.translator is not None and not self.english_gold:
            # Both are reported: the English answers as they are (the paper's translate-test),
            # and translated back into the target language (the headline metrics).
            extra["metrics_without_back_translation"] = score(rows, self.batcher)
            self.pairs.back_translate_answers(rows, out)
        return rows, score(rows, self.batcher), extra
