"""Per-call state of models that run a source pass before the target pass, and the small
interface those models share (FLARE, FLARE MT, X-Mixup).

A call's state (what the source pass recorded, the alignment map; an object with
``checkpoint_inputs()`` and ``with_inputs(tensors)``) is visible to the model's
layers only while that call runs, and again while gradient checkpointing recomputes that call's
layers during backward: the checkpointed function is wrapped so that it re-enters the call it was
created in. The state lives as long as the autograd graph that may recompute it, no longer.
Outside a call, layers that need a source find none and say so.
"""

from __future__ import annotations

import contextlib

from torch import nn


class CallSlot:
    """Which call of one model is running (``active``; None between calls)."""

    def __init__(self, checkpointed_fusion: bool = True):
        self.active = None
        self.checkpointed_fusion = checkpointed_fusion  # False: checkpointed layers run without fusion
        self._checkpointed: list[nn.Module] | None = None

    @contextlib.contextmanager
    def running(self, call):
        """Make ``call`` the active call; the previous one comes back on exit, whatever happens."""
        previous, self.active = self.active, call
        try:
            yield call
        finally:
            self.active = previous

    def bind_checkpointing(self, model: nn.Module) -> None:
        """Make every checkpointed layer of ``model`` recompute inside the call that ran it.

        transformers gives each checkpointable layer a ``_gradient_checkpointing_func`` when
        checkpointing is enabled (by whoever enables it); each one is wrapped once.
        """
        if self._checkpointed is None:
            self._checkpointed = [m for m in model.modules() if hasattr(m, "gradient_checkpointing")]
        for module in self._checkpointed:
            func = module.__dict__.get("_gradient_checkpointing_func")
            if func is not None and getattr(func, "call_slot", None) is not self:
                module._gradient_checkpointing_func = self._wrap(func)

    def reads_no_source(self, fused: list[nn.Module]) -> bool:
        """True when ``checkpointed_fusion`` is off and every one of ``fused`` (the fused layers)
        runs checkpointed in the coming forward: none of them reads a source, so the source pass
        is not needed (its result would be discarded)."""
        if self.checkpointed_fusion or not fused or self._checkpointed is None:
            return False
        covered = set()
        for module in self._checkpointed:
            if module.gradient_checkpointing and module.training and "_gradient_checkpointing_func" in module.__dict__:
                covered.update(id(m) for m in module.modules())
        return all(id(layer) in covered for layer in fused)

    def _wrap(self, checkpoint):
        def checkpoint_in_call(function, *args, **kwargs):
            call = self.active  # the call this layer runs in now, and recomputes in later
            if call is not None and not self.checkpointed_fusion:
                call = call.without_fusion()
            # Tensors of the call that need gradients (FLARE MT's projected states) go in as
            # checkpoint inputs: a reentrant checkpoint passes gradients back only to its inputs.
            extra = call.checkpoint_inputs() if call is not None and self.checkpointed_fusion else ()

            def run(*run_args, **run_kwargs):
                inputs = run_args[len(run_args) - len(extra):] if extra else ()
                with self.running(call.with_inputs(inputs) if extra else call):
                    return function(*run_args[: len(run_args) - len(extra)], **run_kwargs)

            return checkpoint(run, *args, *extra, **kwargs)

        checkpoint_in_call.call_slot = self
        return checkpoint_in_call


class TwoPassModel(nn.Module):
    """What the training loop, the benchmark and the pipeline use of a stage-2 model that reads
    a source: the transformers model inside (``hf_model``), ``generate`` and gradient
    checkpointing. Subclasses hold a ``slot`` (``CallSlot``) and run each call inside it."""

    slot: CallSlot

    @property
    def hf_model(self) -> nn.Module:
        raise NotImplementedError

    def generate(self, *args, **kwargs):
        raise NotImplementedError

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """Checkpoint the transformers layers (default: non-reentrant); each recomputation runs
        in the call that created it."""
        _enable_checkpointing(self.hf_model, gradient_checkpointing_kwargs)
        self.slot.bind_checkpointing(self.hf_model)


def _enable_checkpointing(hf: nn.Module, kwargs: dict | None) -> None:
    kwargs = dict(kwargs or {"use_reentrant": False})
    if hasattr(hf, "activation_checkpointing_enable"):  # transformers 5 name
        hf.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if kwargs.get("use_reentrant", True):
        hf.enable_input_require_grads()  # a reentrant checkpoint needs an input that requires grad


def enable_gradient_checkpointing(model: nn.Module, use_reentrant: bool = False) -> None:
    """Gradient checkpointing for any stage-1 or stage-2 model: a ``TwoPassModel`` or a PEFT /
    transformers model."""
    kwargs = {"use_reentrant": use_reentrant}
    if isinstance(model, TwoPassModel):
        model.gradient_checkpointing_enable(kwargs)
    else:
        _enable_checkpointing(model.get_base_model() if hasattr(model, "get_base_model") else model, kwargs)

