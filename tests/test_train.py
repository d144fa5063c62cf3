"""The resumable training checkpoint: a job killed at any moment leaves one to resume from."""

from pathlib import Path
from unittest import mock

import pytest
import torch

from omegaconf import OmegaConf

from flare_exp.train import Checkpoint, train_model


def _tiny_lora():
    """A tiny Llama with a LoRA adapter, a batcher of fixed random token rows, 32 examples."""
    from peft import LoraConfig, get_peft_model

    from tiny import padded_batch, tiny_model

    model = get_peft_model(tiny_model("llama"), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    ids, mask = padded_batch([8] * 32, "left", 3)

    def batcher(examples, english=None, train=True):
        rows = [ex["row"] for ex in examples]
        return {"input_ids": ids[rows], "attention_mask": mask[rows], "labels": ids[rows]}

    return model, batcher, [{"row": i} for i in range(32)]


def _state(weight: float):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.fill_(weight)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return model, optimizer, scheduler


def test_a_checkpoint_survives_a_kill_between_its_renames(tmp_path):
    checkpoint = Checkpoint(tmp_path / "checkpoint", every=2)
    checkpoint.save(*_state(1.0), {"step": 2})
    real_rename = Path.rename

    def killed_after_moving_the_old_one_aside(self, target):
        real_rename(self, target)
        if target.name.endswith(".previous"):
            raise KeyboardInterrupt  # the job dies here, before the new checkpoint moves in

    with mock.patch.object(Path, "rename", killed_after_moving_the_old_one_aside), pytest.raises(KeyboardInterrupt):
        checkpoint.save(*_state(2.0), {"step": 4})
    assert not checkpoint.folder.exists()

    model, optimizer, scheduler = _state(0.0)
    assert checkpoint.load(model, optimizer, scheduler) == ({"step": 2}, None)
    assert torch.equal(model.weight, torch.full((2, 3), 1.0))

    checkpoint.save(*_state(3.0), {"step": 6})  # the next save tidies up
    model, optimizer, scheduler = _state(0.0)
    assert checkpoint.load(model, optimizer, scheduler) == ({"step": 6}, None)
    assert torch.equal(model.weight, torch.full((2, 3), 3.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]
    checkpoint.remove()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("select", ["best", "last"])
def test_model_selection_restores_the_selected_adapter(select):
    """Validation every 2 steps; the adapter of the best-scoring validation (or the last) is the
    one the model holds at the end, and the record says which step that was."""
    from flare_exp.train import Validation

    model, batcher, examples = _tiny_lora()
    scores, snapshots = iter([0.2, 0.9, 0.4, 0.1]), []

    def score():
        snapshots.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
        return next(scores)

    cfg = OmegaConf.create({"lr": 1e-2, "weight_decay": 0.0, "batch_size": 4, "grad_accum": 1, "epochs": 1,
                            "max_steps": 8, "warmup_ratio": 0.0, "gradient_checkpointing": False})
    stats = train_model(model, batcher, examples, None, cfg, seed=0, device="cpu", desc="select",
                        validation=Validation(score, every=2, select=select))
    assert [v["step"] for v in stats["validation"]] == [2, 4, 6, 8]
    assert [v["score"] for v in stats["validation"]] == [0.2, 0.9, 0.4, 0.1]
    chosen = 1 if select == "best" else 3
    assert stats["selected_step"] == 2 * (chosen + 1)
    final = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    for name, value in snapshots[chosen].items():
        assert torch.equal(final[name], value), name
    assert not all(torch.equal(snapshots[1][n], snapshots[3][n]) for n in final)  # training moved it


def test_precision_and_optimizer_settings_reach_the_loop():
    bnb = pytest.importorskip("bitsandbytes")
    model, batcher, examples = _tiny_lora()
    dtypes = []
    layer = next(m for n, m in model.named_modules() if n.endswith("layers.0.self_attn.q_proj.base_layer"))
    layer.register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
    cfg = OmegaConf.create({"lr": 1e-2, "weight_decay": 0.0, "batch_size": 4, "grad_accum": 1, "epochs": 1,
                            "max_steps": 3, "warmup_ratio": 0.0, "gradient_checkpointing": False,
                            "optimizer": "adamw_8bit", "autocast": "bfloat16"})
    with mock.patch.object(bnb.optim, "AdamW8bit", wraps=bnb.optim.AdamW8bit) as eight_bit:
        train_model(model, batcher, examples, None, cfg, seed=0, device="cpu", desc="precision")
    assert eight_bit.called and dtypes and set(dtypes) == {torch.bfloat16}
    with pytest.raises(ValueError, match="Unknown optimizer"):
        train_model(model, batcher, examples, None, OmegaConf.merge(cfg, {"optimizer": "sgd"}), seed=0,
                    device="cpu", desc="bad")


def test_length_grouped_batches_cover_every_example_once_and_pad_less():
    import random

    from flare_exp.data import load_examples
    from flare_exp.data.batching import example_length, length_grouped

    examples = load_examples("nusax", "jav", "train", Path(__file__).resolve().parent.parent.parent / "shared/data") \
        if (Path(__file__).resolve().parent.parent.parent / "shared/data/nusax_senti").is_dir() else \
        [{"id": str(i), "text": "w " * random.Random(i).randint(1, 60), "label": "neutral"} for i in range(500)]
    lengths = [example_length(ex) for ex in examples]
    order = list(range(len(examples)))
    random.Random(0).shuffle(order)
    grouped = length_grouped(order, lengths, 16)
    assert sorted(i for batch in grouped for i in batch) == sorted(order)
    assert all(len(batch) <= 16 for batch in grouped)

    def padding(batches):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    plain = [order[i:i + 16] for i in range(0, len(order), 16)]
    assert padding(grouped) < padding(plain) / 3


def test_grouped_prediction_keeps_the_examples_order(tmp_path, make_cfg):
    from flare_exp.data import load_examples
    from flare_exp.evaluate import predict
    from flare_exp.models import load_base_model
    from flare_exp.setup import Setup

    cfg = make_cfg(["model=tiny-bert", "task=demo", "lang=dmb", "method=zero_shot"], tmp_path)
    setup = Setup(cfg)
    model = load_base_model(cfg.model, setup.tokenizer, list(cfg.task.labels), torch.device("cpu"), tmp_path, 0)
    examples = load_examples("demo", "dmb", "test")[:40]
    rows = predict(model, setup.batcher, examples, None, 8, "cpu", 4, "test")
    assert [r["id"] for r in rows] == [ex["id"] for ex in examples]
    assert [r["gold"] for r in rows] == [ex["label"] for ex in examples]


def test_grouped_epochs_replay_identically_for_a_resume():
    import random

    from flare_exp.data.batching import epoch_batches, example_length

    targets = [{"id": str(i), "text": "w " * random.Random(i).randint(1, 40)} for i in range(200)]
    runs = []
    for _ in range(2):
        rng, order = random.Random(7), list(range(200))
        lengths = [example_length(t) for t in targets]
        runs.append([epoch_batches(order, lengths, 8, rng) for _epoch in range(3)])
    assert runs[0] == runs[1]
    first = runs[0][0]
    assert first != runs[0][1]  # every epoch is shuffled anew
    spread = [max(example_length(targets[i]) for i in b) - min(example_length(targets[i]) for i in b) for b in first]
    assert sum(spread) / len(spread) < 20  # similar lengths within a batch (lengths span 2-80)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
@pytest.mark.parametrize("fused", [False, "given", "derived"], ids=["lora", "flare", "flare-no-prompt-lengths"])
def test_the_answer_only_loss_equals_the_models_own_loss_and_gradients(family, fused):
    """A decoder batch ends every row with its answer (left padding; answers of 1-3 tokens after
    prompts of several lengths): ``training_loss`` computes the logits of the answer positions
    alone, and its loss and every gradient equal the model's own loss over the whole sequence
    (transformers' causal-LM loss; Gemma 2 soft-caps its logits). A fused batch without its
    ``target_prompt_lengths`` gets them from its labels, as the model's own forward does."""
    from peft import LoraConfig, get_peft_model

    from flare_exp.flare import FlareConfig, get_flare_model
    from flare_exp.train import answers_last, training_loss
    from tiny import padded_batch, randomize_lora, tiny_model

    if fused:
        model = get_flare_model(tiny_model(family), FlareConfig(r=4, alpha=8, target_modules="all-linear",
                                                                fusion="add_relu"))
        randomize_lora(model.peft_model, seed=2, scale=0.3)
    else:
        model = get_peft_model(tiny_model(family), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
        randomize_lora(model, seed=2, scale=0.3)
    answers = [1, 3, 2, 1]
    ids, mask = padded_batch([9, 6, 12, 4], "left", seed=5)
    labels = torch.full_like(ids, -100)
    for row, n in enumerate(answers):
        labels[row, -n:] = ids[row, -n:]
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if fused:
        source_ids, source_mask = padded_batch([7, 5, 10, 3], "left", seed=6)
        batch.update(source_input_ids=source_ids, source_attention_mask=source_mask)
        if fused == "given":
            batch["target_prompt_lengths"] = mask.sum(1) - torch.tensor(answers)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    batcher = type("DecoderBatcher", (), {"kind": "decoder"})()
    assert answers_last(model, batcher) and not answers_last(model, type("B", (), {"kind": "encoder"})())

    calls = []
    handle = model.register_forward_pre_hook(lambda m, args, kwargs: calls.append(kwargs.get("logits_to_keep")),
                                             with_kwargs=True)
    own = model(**batch).loss
    own_grads = torch.autograd.grad(own, params)
    kept = training_loss(model, batch, answers_at_end=True)
    kept_grads = torch.autograd.grad(kept, params)
    handle.remove()
    assert calls == [None, 4]  # the logits of the last 4 positions: the longest answer (3) and the one before
    torch.testing.assert_close(kept, own, atol=1e-6, rtol=1e-5)
    for a, b in zip(kept_grads, own_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(training_loss(model, batch), own)  # without answers_at_end: the model's own loss


@pytest.mark.parametrize("task", ["demo", "tydiqa"])
def test_stage1_is_validated_every_tenth_and_keeps_its_best_step_except_for_tydiqa(tmp_path, make_cfg, small, task,
                                                                                     qa_data):
    """As the official code selects stage 1 (run_task_ft.py: validation every max_steps // 10 on the
    English validation data, load_best_model_at_end except for TyDiQA): the curve and the selected
    step go into stage1.json, and the stage-1 model holds the selected step's adapter."""
    import json

    from flare_exp import record
    from flare_exp.evaluate import predict, score
    from flare_exp.setup import Setup

    extra = ([f"data.dir={qa_data}", "task=tydiqa", "mt=fake", "lang=sw", "task.max_length=64", "task.stride=16",
              "task.max_new_tokens=6"] if task == "tydiqa" else [])
    cfg = make_cfg([*small, "model=minilm", "method=lora", "lang=dmb", "stage1.epochs=2", "stage1.batch_size=4",
                    *extra], tmp_path)
    setup = Setup(cfg)
    model = setup.stage1()
    stats = json.loads((setup.stage1_path / record.STAGE1_RECORD).read_text())["train"]
    steps = stats["steps"]
    curve = stats["validation"]
    assert [p["step"] for p in curve] == list(range(round(steps / 10), steps + 1, round(steps / 10)))
    rows = predict(model, setup.stage1_batcher, setup.examples("en", "validation"), None, 32, torch.device("cpu"),
                   cfg.task.max_new_tokens, desc="check")
    now = score(rows, setup.stage1_batcher)[cfg.task.metric]
    if task == "tydiqa":
        assert stats["selection"] == "last" and stats["selected_step"] == steps
        assert now == pytest.approx(curve[-1]["score"])
    else:
        best = max(curve, key=lambda p: p["score"])  # the first of equal scores
        assert stats["selection"] == "best" and stats["selected_step"] == best["step"]
        assert now == pytest.approx(best["score"])
