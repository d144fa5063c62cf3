"""The FLARE model: a PEFT LoRA model whose fused layers read a source pass (spec sections 2-6)."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn

from .alignment import build_source_index, last_source_position, prompt_lengths
from .calls import CallSlot, TwoPassModel
from .config import FlareConfig, resolve_fuse_modules
from .fusion import SEQUENCE_FUSIONS, attention_dropout, make_fusion
from .layers import FlareLayerMixin, SourceCall, SourcePassDone, _linear4bit_class, custom_module_mapping

STAGE1_ADAPTER = "stage1"
WEIGHTS_NAME = "adapter_model.safetensors"


def disable_cpu_bf16_repack(model: nn.Module) -> int:
    """Stop bitsandbytes from repacking 4-bit weights in place on CPU eval forwards.

    On CPUs with AVX512-BF16, a no-grad eval forward through ``Linear4bit`` repacks its weight,
    after which LoRA gradients through the layer silently vanish. Returns the layers changed.
    """
    linear4bit = _linear4bit_class()
    if linear4bit is None:
        return 0
    count = 0
    for module in model.modules():
        if isinstance(module, linear4bit[0]):
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count


def keeps_stage1_adapter(model: nn.Module) -> bool:
    """The one rule for stage 1 under a stage-2 adapter: on 4-bit weights it stays a frozen
    adapter (merging would re-quantise them); on full-precision weights it is merged in."""
    linear4bit = _linear4bit_class()
    return linear4bit is not None and any(isinstance(m, linear4bit[0]) for m in model.modules())


def _lora_config(config: FlareConfig, target_modules) -> LoraConfig:
    lora = LoraConfig(
        r=config.r,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=target_modules,
        modules_to_save=config.modules_to_save,
    )
    lora._register_custom_module(custom_module_mapping())
    return lora


class FlareModel(TwoPassModel):
    """A PEFT model with a FLARE adapter; see ``get_flare_model``.

    ``forward`` and ``generate`` take the target input as usual plus the source (English) input
    ``source_input_ids``/``source_attention_mask``, or precomputed ``source_states`` (batch x Ls x
    hidden, read by every fused projection). Everything else is passed to the wrapped model.
    The wrapped PEFT model is ``self.peft_model``.

    The model builds the alignment map itself from its ``FlareConfig`` (spec D5) and the
    attention masks. For a causal LM, target positions after the prompt (answer tokens under
    teacher forcing) fuse the last source position; the prompt is given by
    ``target_prompt_lengths`` (real prompt tokens per row) or, when that is absent and ``labels``
    are passed, by each row's real tokens before its first label that is not -100. Without
    either, the whole target is prompt. ``source_index`` overrides the map (expert use).

    Each call owns its state: outside a call (for example ``flare.hf_model(...)`` after a
    training step) a fused layer raises ``MissingSourceError``, and gradient checkpointing
    recomputes a layer with the source of the call that ran it.
    """

    def __init__(self, peft_model: PeftModel, config: FlareConfig, slot: CallSlot, causal: bool, n_fused: int):
        super().__init__()
        self.peft_model = peft_model
        self.flare_config = config
        self.slot = slot
        self.causal = causal
        self.n_fused = n_fused
        self._fused: list[nn.Module] | None = None  # the fused layers, found on first use
        self.is_encoder_decoder = bool(getattr(self.hf_model.config, "is_encoder_decoder", False))
        self.anchor = config.anchor or ("end" if causal else "start")

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.peft_model, name)

    @property
    def hf_model(self) -> nn.Module:
        """The transformers model, with the adapter layers injected in place."""
        return self.peft_model.base_model.model

    # -- the source pass -------------------------------------------------------------------
    def source_pass(self, source_input_ids, source_attention_mask, source_token_type_ids=None) -> SourceCall:
        """A new call holding the input of every fused projection on the source (spec section 3, D2).

        Runs without gradients, with the FLARE adapter off (a frozen stage-1 adapter stays on),
        in eval mode (no dropout: the source is the stage-1 model's deterministic English
        representation; ``source_train_mode``: in the model's own mode), and stops as soon as the last fused projection has its input: no
        later layer, LM head or loss is computed. Train mode and the active call are restored
        whatever happens.
        """
        call = self._call()
        hf = self.hf_model
        extra = {} if source_token_type_ids is None else {"token_type_ids": source_token_type_ids}
        was_training = hf.training
        if not self.flare_config.source_train_mode:
            hf.eval()
        try:
            with torch.no_grad(), self.slot.running(call):
                if self.is_encoder_decoder:
                    hf.get_encoder()(input_ids=source_input_ids, attention_mask=source_attention_mask, **extra)
                else:
                    if self.causal:
                        extra["use_cache"] = False
                    hf(input_ids=source_input_ids, attention_mask=source_attention_mask, **extra)
        except SourcePassDone:
            pass
        finally:
            hf.train(was_training)
        return call

    def _new_call(self, source_input_ids, source_attention_mask, source_states, source_token_type_ids=None):
        """(the call, the source attention mask) of one forward or generate."""
        if source_states is None and source_input_ids is None:
            raise ValueError(
                "FLARE needs the source: pass source_input_ids and source_attention_mask "
                "(or source_states)."
            )
        if source_attention_mask is None:
            reference = source_states if source_states is not None else source_input_ids
            source_attention_mask = torch.ones(reference.shape[:2], dtype=torch.long, device=reference.device)
        needed = self.needs_source_pass()  # binds the checkpointed layers to this call's slot too
        if source_states is None and needed:
            call = self.source_pass(source_input_ids, source_attention_mask, source_token_type_ids)
        else:
            call = self._call()
        return call, source_attention_mask

    def needs_source_pass(self) -> bool:
        """Whether the coming forward reads the English source: not where ``checkpointed_fusion``
        is off and every fused layer runs checkpointed (training under gradient checkpointing)."""
        self.slot.bind_checkpointing(self.hf_model)
        return not self.slot.reads_no_source(self._fused_layers())

    def _fused_layers(self) -> list[nn.Module]:
        if self._fused is None:
            self._fused = [m for m in self.hf_model.modules() if isinstance(m, FlareLayerMixin) and m.is_fused]
        return self._fused

    def _call(self) -> SourceCall:
        return SourceCall(self.causal, {self.flare_config.adapter_name}, self.n_fused)

    def _prompt_lengths(self, attention_mask, labels):
        """Real tokens before the first label that is not -100, for causal LMs (None otherwise)."""
        if not self.causal or labels is None or labels.shape != attention_mask.shape:
            return None
        return prompt_lengths(attention_mask, labels)

    # -- forward and generate --------------------------------------------------------------
    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        source_input_ids=None,
        source_attention_mask=None,
        source_states=None,
        source_token_type_ids=None,
        target_prompt_lengths=None,
        source_index=None,
        **kwargs,
    ):
        if attention_mask is None:
            reference = input_ids if input_ids is not None else kwargs["inputs_embeds"]
            attention_mask = torch.ones(reference.shape[:2], dtype=torch.long, device=reference.device)
        call, source_attention_mask = self._new_call(
            source_input_ids, source_attention_mask, source_states, source_token_type_ids
        )
        if source_index is None:
            if target_prompt_lengths is None:
                target_prompt_lengths = self._prompt_lengths(attention_mask, kwargs.get("labels"))
            source_index = self.source_index(attention_mask, source_attention_mask, target_prompt_lengths)
        call.start_target(source_index, attention_mask, source_states)
        with self.slot.running(call):
            return self.peft_model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def source_index(self, attention_mask, source_attention_mask, target_prompt_lengths=None):
        """The alignment map of this model's configuration (spec D5)."""
        cfg = self.flare_config
        return build_source_index(
            attention_mask,
            source_attention_mask,
            strategy=cfg.alignment,
            anchor=self.anchor,
            target_prompt_lengths=target_prompt_lengths,
            mask_source_padding=cfg.mask_source_padding,
        )

    @torch.no_grad()
    def generate(
        self,
        input_ids=None,
        attention_mask=None,
        source_input_ids=None,
        source_attention_mask=None,
        source_states=None,
        **generate_kwargs,
    ):
        """Generate under spec D7: the prompt fuses its aligned source states, and every
        generated token fuses the source's last prompt state (the training alignment of
        answer tokens)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        call, source_attention_mask = self._new_call(source_input_ids, source_attention_mask, source_states)
        prefill = self.source_index(attention_mask, source_attention_mask)
        call.start_target(prefill, attention_mask, source_states)
        hf = self.hf_model
        handle = None
        if not self.is_encoder_decoder:  # encoder-decoders fuse in the encoder, which runs once
            last = last_source_position(source_attention_mask)
            if self.flare_config.fusion in SEQUENCE_FUSIONS:
                # These fusions read every earlier target state, which a KV cache does not keep.
                generate_kwargs["use_cache"] = False

            def set_step_alignment(module, args, kwargs):
                ids = kwargs.get("input_ids", args[0] if args else None)
                if ids is None:
                    ids = kwargs["inputs_embeds"]
                batch, length = ids.shape[:2]
                if batch != prefill.shape[0]:
                    raise ValueError(
                        "FLARE generation needs one sequence per source example: beam search and "
                        "num_return_sequences > 1 are not supported."
                    )
                cache = kwargs.get("past_key_values")
                past = cache.get_seq_length() if cache is not None else 0
                positions = torch.arange(past, past + length, device=ids.device)
                from_prompt = prefill[:, positions.clamp(max=prefill.shape[1] - 1)]
                index = torch.where(positions < prefill.shape[1], from_prompt, last[:, None])
                mask = kwargs.get("attention_mask")
                mask = mask[:, past : past + length] if mask is not None else None
                call.start_target(index, mask, source_states)

            handle = hf.register_forward_pre_hook(set_step_alignment, with_kwargs=True)
        try:
            with self.slot.running(call):
                return hf.generate(input_ids=input_ids, attention_mask=attention_mask, **generate_kwargs)
        finally:
            if handle is not None:
                handle.remove()

    # -- saving and loading ----------------------------------------------------------------
    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The FLARE adapter's own weights (LoRA A/B, fusion parameters, modules to save)."""
        tag = f".{self.flare_config.adapter_name}."
        return {k: v for k, v in self.peft_model.state_dict().items() if tag in k}

    def save_pretrained(self, directory: str | Path) -> None:
        """Write ``flare_config.json`` and the adapter weights as safetensors."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.flare_config.save(directory)
        state = {k: v.detach().contiguous().cpu() for k, v in self.adapter_state_dict().items()}
        save_file(state, str(directory / WEIGHTS_NAME))

    @classmethod
    def from_pretrained(cls, model: nn.Module, directory: str | Path) -> "FlareModel":
        """Rebuild the FLARE model on ``model`` (the same stage-1 model) and load its weights."""
        config = FlareConfig.load(directory)
        flare = get_flare_model(model, config)
        weights = load_file(str(Path(directory) / WEIGHTS_NAME))
        expected = set(flare.adapter_state_dict())
        if set(weights) != expected:
            missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
            raise ValueError(
                f"The adapter in {directory} does not fit this model: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}."
            )
        flare.peft_model.load_state_dict(weights, strict=False)
        return flare


# LoRA options whose computation the FLARE layers (plain W x + s B A x per adapter) do not implement.
UNSUPPORTED_LORA_OPTIONS = (
    "use_dora", "lora_bias", "use_qalora", "alora_invocation_tokens", "velora_config", "monteclora_config",
    "arrow_config", "kasa_config", "use_bdlora", "megatron_config", "target_parameters",
    "trainable_token_indices", "layer_replication",
)


def check_lora_options(config: LoraConfig, which: str) -> None:
    """Refuse a LoRA adapter that the FLARE layers would silently run as plain LoRA."""
    used = [name for name in UNSUPPORTED_LORA_OPTIONS if getattr(config, name, None)]
    if used:
        raise ValueError(
            f"The {which} uses {', '.join(used)}, which FLARE's layers do not implement (they compute "
            "plain LoRA, W x + s B A x): train it without, or on full-precision weights, into which "
            "it is merged before FLARE is added."
        )


def _split_stage1(model: nn.Module):
    """From a stage-1 model, the base to add FLARE to and the stage-1 adapter to keep (or None).

    Full-precision weights: the stage-1 LoRA is merged in. 4-bit weights: merging would
    re-quantise them, so the stage-1 adapter is kept as a frozen second adapter (spec section 8).
    """
    if not isinstance(model, PeftModel):
        return model, None
    if len(model.peft_config) != 1:
        raise ValueError("A stage-1 model must hold exactly one adapter.")
    if not keeps_stage1_adapter(model):
        return model.merge_and_unload(), None
    name = model.active_adapter
    check_lora_options(model.peft_config[name], "stage-1 adapter")
    stage1_config = copy.deepcopy(model.peft_config[name])
    tag = f".{name}."
    weights = {
        k.replace(tag, f".{STAGE1_ADAPTER}."): v
        for k, v in model.state_dict().items()
        if tag in k and "lora_" in k
    }
    return model.unload(), (stage1_config, weights)


def get_flare_model(model: nn.Module, config: FlareConfig) -> FlareModel:
    """Add a fresh FLARE adapter to ``model`` (a transformers model or a stage-1 PEFT model).

    The FLARE adapter's B starts at zero, so the result starts exactly at the stage-1 model. Only
    the adapter's parameters (and cross-attention fusion weights) are trainable.
    """
    base, stage1 = _split_stage1(model)
    disable_cpu_bf16_repack(base)
    fused_names = resolve_fuse_modules(base, config)
    modules = dict(base.named_modules())
    fused_ids = {id(modules[n]) for n in fused_names}
    target_modules = config.target_modules if config.target_modules is not None else fused_names

    for param in base.parameters():
        param.requires_grad_(False)
    peft_model = get_peft_model(base, _lora_config(config, target_modules), adapter_name=config.adapter_name)

    is_encoder_decoder = bool(getattr(base.config, "is_encoder_decoder", False))
    causal = not is_encoder_decoder and ("ForCausalLM" in type(base).__name__ or base.can_generate())
    slot = CallSlot(config.checkpointed_fusion)

    if stage1 is not None:
        stage1_config, weights = stage1
        stage1_config._register_custom_module(custom_module_mapping())
        peft_model.add_adapter(STAGE1_ADAPTER, stage1_config)
        missing = set(weights) - set(peft_model.state_dict())
        if missing:
            raise ValueError(f"Stage-1 adapter weights do not fit: {sorted(missing)[:5]}.")
        peft_model.load_state_dict(weights, strict=False)
        peft_model.base_model.set_adapter([config.adapter_name, STAGE1_ADAPTER])
        for name, param in peft_model.named_parameters():
            if f".{STAGE1_ADAPTER}." in name:
                param.requires_grad_(False)

    n_fused = 0
    for name, module in peft_model.named_modules():
        if not isinstance(module, FlareLayerMixin):
            continue
        module.flare_name = name
        module._flare_slot = slot
        if id(module.get_base_layer()) in fused_ids:
            lora_A = module.lora_A[config.adapter_name]
            fusion = make_fusion(config.fusion, config.r, config.heads, config.official_fusion_layer,
                                 attention_dropout(base.config))
            module.lora_fusion[config.adapter_name] = fusion.to(lora_A.weight.device, lora_A.weight.dtype)
            n_fused += 1
    if n_fused != len(fused_ids):
        raise ValueError(
            "Every fused module must also be a LoRA target: target_modules does not cover "
            f"all of {fused_names}."
        )

    for name, param in peft_model.named_parameters():
        if f"lora_fusion.{config.adapter_name}." in name:
            param.requires_grad_(True)
    return FlareModel(peft_model, config, slot, causal, n_fused)
