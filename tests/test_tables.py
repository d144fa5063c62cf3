"""Paper tables from a fixture directory of results (markdown snapshot), missing runs, the
paired bootstrap and plots."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flare_exp.report.experiments import expected_runs
from flare_exp.report.significance import paired_bootstrap
from flare_exp.tables import build

LABELS = ["negative", "neutral", "positive"]


def write_run(root: Path, method: str, correct: int, n: int = 10, seed: int = 100, folder: Path | None = None,
              identity: dict | None = None):
    """A finished demo run whose first ``correct`` of ``n`` predictions are right."""
    folder = folder or root / "runs/demo/minilm/gold" / method / "dmb" / f"seed{seed}"
    folder.mkdir(parents=True)
    rows = []
    for i in range(n):
        gold = LABELS[i % 3]
        prediction = gold if i < correct else LABELS[(i + 1) % 3]
        rows.append({"id": f"demo-test-{i}", "gold": gold, "prediction": prediction, "output": prediction})
    (folder / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = {"task": "demo", "model": "minilm", "mt": "gold", "method": method, "lang": "dmb", "seed": seed,
              "headline_metric": "accuracy", "metrics": {"accuracy": correct / n, "macro_f1": 0.0, "n": n,
                                                         "invalid": 0},
              "stage1_english": {"accuracy": 1.0}, "config": {"task": {"labels": LABELS}}, **({"identity": identity} if identity else {})}
    (folder / "results.json").write_text(json.dumps(result))
    return folder


def test_expected_runs_of_an_experiment(tmp_path):
    jobs = expected_runs("demo", [f"output_dir={tmp_path}"])
    assert sorted(choice["method"] for choice, _ in jobs) == ["flare", "lora", "translate_test", "zero_shot"]
    assert all(str(path).startswith(str(tmp_path / "runs/demo/minilm/gold")) for _, path in jobs)


def test_table_snapshot_and_missing_runs(tmp_path, capsys):
    folders = {choice["method"]: folder for choice, folder in expected_runs("demo", [f"output_dir={tmp_path}"])}
    for method, correct in [("zero_shot", 4), ("lora", 8), ("flare", 9)]:
        write_run(tmp_path, method, correct, folder=folders[method])
    report = build("demo", [f"output_dir={tmp_path}"], tmp_path / "tables", samples=200)
    assert report["declared"] == 4 and report["finished"] == 3
    assert report["missing"] == [{"method": "translate_test"}]
    assert "translate_test" in capsys.readouterr().out
    folder = tmp_path / "tables/demo"
    assert (folder / "table.md").read_text() == (
        "| method | minilm | paper | Δ |\n"
        "|---|---|---|---|\n"
        "| zero_shot | 40.00 | – | – |\n"
        "| lora | 80.00 | – | – |\n"
        "| flare | **90.00** | – | – |\n"
    )
    assert r"\textbf{90.00}" in (folder / "table.tex").read_text()
    assert "| flare | **90.00** | **90.00** |" in (folder / "languages_minilm.md").read_text()
    significance = (folder / "significance.md").read_text()
    assert "| demo | minilm | gold | dmb | 100 | +10.00 |" in significance
    plots = sorted(p.name for p in (folder / "plots").iterdir())
    assert plots == ["flare_minus_lora_minilm.png", "languages_minilm.png"]
    assert all((folder / "plots" / p).stat().st_size > 1000 for p in plots)


def test_paired_bootstrap_p_values(tmp_path):
    better = write_run(tmp_path / "a", "flare", 95, n=100)
    worse = write_run(tmp_path / "a", "lora", 60, n=100)
    same = write_run(tmp_path / "b", "flare", 60, n=100)
    strong = paired_bootstrap(better, worse, "accuracy", samples=500)
    assert strong["difference"] == pytest.approx(35.0) and strong["p_value"] < 0.01
    tie = paired_bootstrap(same, worse, "accuracy", samples=500)
    assert tie["difference"] == 0 and tie["p_value"] == 1.0
    macro = paired_bootstrap(better, worse, "macro_f1", samples=200)
    assert macro["difference"] > 0 and macro["p_value"] < 0.05


def test_bootstrap_macro_f1_is_the_scored_macro_f1(tmp_path):
    """One macro-F1 over the task's labels: the bootstrap's observed difference equals the
    difference of the scores results.json holds, also when a label never occurs in the gold."""
    from flare_exp.metrics import macro_f1

    runs = {}
    for method, predictions in [("flare", ["negative", "positive", "neutral", None]),
                                ("lora", ["negative", "negative", "neutral", "neutral"])]:
        folder = tmp_path / method
        folder.mkdir()
        gold = ["negative", "positive", "negative", "positive"]  # "neutral" never the gold label
        rows = [{"id": str(i), "gold": g, "prediction": p, "output": str(p)} for i, (g, p) in
                enumerate(zip(gold, predictions))]
        (folder / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (folder / "results.json").write_text(json.dumps({"config": {"task": {"labels": LABELS}}}))
        runs[method] = (folder, macro_f1(gold, predictions, LABELS))
    result = paired_bootstrap(runs["flare"][0], runs["lora"][0], "macro_f1", samples=50)
    assert result["difference"] == pytest.approx(100 * (runs["flare"][1] - runs["lora"][1]))


def test_settings_that_cannot_change_a_result_do_not_split_a_method(tmp_path):
    """A record written before a setting was declared result-neutral (here data.empty_texts)
    compares equal to one without it; a real difference still splits the row."""
    from flare_exp.report.results import load_results

    base = {"train": {"lr": 2e-5}, "data": {"dir": None}, "seed": 100}
    paths = [write_run(tmp_path, "lora", 5, seed=100, identity=base) / "results.json",
             write_run(tmp_path, "lora", 6, seed=101, identity={**base, "seed": 101,
                                                                 "data": {"dir": None, "empty_texts": "warn"}})
             / "results.json"]
    assert set(load_results(paths)["method"]) == {"lora"}
    other = write_run(tmp_path, "lora", 7, seed=102, identity={**base, "seed": 102, "train": {"lr": 1e-3}})
    assert set(load_results([*paths, other / "results.json"])["method"]) == {
        "lora [train.lr=2e-05]", "lora [train.lr=0.001]"}


def _frame(rows):
    import pandas as pd

    return pd.DataFrame([{"task": "xnli", "model": "xlmr-large", "mt": "gold", "english_score": None, **r} for r in rows])


def test_a_cell_over_fewer_languages_is_marked_and_not_compared_with_the_paper():
    from flare_exp.report.tables import paper_table, summary

    rows = [{"method": "lora", "lang": lang, "seed": 100, "accuracy": 0.80} for lang in ("sw", "ur", "hi")]
    rows += [{"method": "flare", "lang": lang, "seed": 100, "accuracy": 0.90} for lang in ("sw", "ur")]
    table = summary(_frame(rows), "accuracy", languages=3, seeds=1).set_index("method")
    assert table.loc["lora", "complete"] and table.loc["lora", "difference"] == pytest.approx(80 - 80.49)
    assert not table.loc["flare", "complete"] and table.loc["flare", "coverage"] == "2/3 langs"
    assert pd_isna(table.loc["flare", "difference"])
    markdown = paper_table(table.reset_index())
    flare_row = next(line for line in markdown.splitlines() if line.startswith("| flare |"))
    lora_row = next(line for line in markdown.splitlines() if line.startswith("| lora |"))
    assert "90.00 (2/3 langs) | 80.99 | – |" in flare_row  # higher, but incomplete: not bold, no Δ
    assert "**80.00**" in lora_row and "-0.49" in lora_row


def pd_isna(value) -> bool:
    import pandas as pd

    return bool(pd.isna(value))


def test_the_sweep_summary_never_averages_over_models():
    from flare_exp.report.results import format_table

    rows = [{"method": "lora", "lang": "sw", "seed": 100, "accuracy": 0.40, "model": "a"},
            {"method": "lora", "lang": "sw", "seed": 100, "accuracy": 0.60, "model": "b"}]
    text = format_table(_frame(rows).assign(model=[r["model"] for r in rows]), "accuracy")
    assert "40.0" in text and "60.0" in text and "50.0" not in text


def test_language_averaged_bootstrap_is_stratified_by_language(tmp_path):
    from flare_exp.report.significance import averaged_bootstrap, p_text

    runs = {(m, lang): write_run(tmp_path, m, c, n=40, folder=tmp_path / m / lang)
            for (m, lang), c in {("flare", "a"): 30, ("lora", "a"): 20, ("flare", "b"): 20, ("lora", "b"): 30}.items()}
    one = averaged_bootstrap([(runs["flare", "a"], runs["lora", "a"])], "accuracy", samples=500)
    assert one == paired_bootstrap(runs["flare", "a"], runs["lora", "a"], "accuracy", samples=500)
    # +25 points in one language, -25 in the other: no difference on average, p near one half
    both = averaged_bootstrap([(runs["flare", "a"], runs["lora", "a"]), (runs["flare", "b"], runs["lora", "b"])],
                              "accuracy", samples=500)
    assert both["difference"] == pytest.approx(0.0) and 0.3 < both["p_value"] < 0.7 and both["n"] == 80
    assert p_text(0.0, 1000) == "<0.001" and p_text(0.0123, 1000) == "0.012"


def test_the_diagnostics_table_gives_invalid_shares_per_language_and_the_stage1_english_score(tmp_path):
    from flare_exp.report.results import load_results
    from flare_exp.report.tables import diagnostics_table

    paths = []
    for method, invalid, english in [("lora", 3, 0.5), ("flare", 0, 0.5), ("zero_shot", 10, 0.5)]:
        folder = write_run(tmp_path, method, 5, n=20)
        result = json.loads((folder / "results.json").read_text())
        result["metrics"]["invalid"] = invalid
        result["stage1_english"] = {"accuracy": english}
        (folder / "results.json").write_text(json.dumps(result))
        paths.append(folder / "results.json")
    text = diagnostics_table(load_results(paths), "minilm")
    assert text.splitlines()[0] == "| method | dmb invalid % | stage-1 English |"
    assert "| zero_shot | 50.00 | 50.00 |" in text
    assert "| lora | 15.00 | 50.00 |" in text
    assert "| flare | 0.00 | 50.00 |" in text
    # the official NusaX scoring's golds read as no label get their own columns where any occur
    result = json.loads(paths[0].read_text())
    result["metrics"]["unread_gold"] = 2
    paths[0].write_text(json.dumps(result))
    text = diagnostics_table(load_results(paths), "minilm")
    assert text.splitlines()[0] == "| method | dmb invalid % | dmb unread gold % | stage-1 English |"
    assert "| lora | 15.00 | 10.00 | 50.00 |" in text and "| flare | 0.00 | – | 50.00 |" in text


def test_the_language_average_covers_only_the_languages_every_method_finished(tmp_path):
    from flare_exp.report.results import load_results
    from flare_exp.report.tables import language_table

    paths = [write_run(tmp_path, "lora", 6, folder=tmp_path / "l-dmb") / "results.json",
             write_run(tmp_path, "flare", 8, folder=tmp_path / "f-dmb") / "results.json"]
    late = write_run(tmp_path, "flare", 10, folder=tmp_path / "f-dma")
    result = json.loads((late / "results.json").read_text())
    (late / "results.json").write_text(json.dumps({**result, "lang": "dma"}))
    text = language_table(load_results([*paths, late / "results.json"]), "minilm", "accuracy")
    assert text.splitlines()[0] == "| method | dma | dmb | avg of dmb |"
    assert "| lora | – | 60.00 | 60.00 |" in text
    assert "| flare | **100.00** | **80.00** | **80.00** |" in text


def test_the_significance_table_compares_any_two_methods(tmp_path):
    from flare_exp.report.results import load_results
    from flare_exp.report.significance import significance_table

    paths = [write_run(tmp_path, method, correct, n=100) / "results.json"
             for method, correct in [("input_fusion", 90), ("flare", 70), ("lora", 60)]]
    frame = load_results(paths)
    text = significance_table(frame, "accuracy", samples=200, a="input_fusion", b="flare")
    assert text.splitlines()[0] == "| task | model | mt | lang | seed | input fusion − FLARE | p (input fusion ≤ FLARE) | n |"
    assert "| demo | minilm | gold | dmb | 100 | +20.00 | <0.005 | 100 |" in text
    assert "| +10.00 |" in significance_table(frame, "accuracy", samples=200)


def test_the_bootstrap_scores_each_example_as_the_runs_official_scoring_did(tmp_path, make_cfg):
    """Under the official scoring, the paired bootstrap's observed difference is the difference of
    the two runs' results.json metrics (flare_exp.evaluate.score), not a re-scoring by the sound rules."""
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from flare_exp.evaluate import score

    def write(name, rows, config, batcher):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (folder / "results.json").write_text(json.dumps({"config": config}))
        return folder, score(rows, batcher)

    labels = ["negative", "neutral", "positive"]
    cfg = make_cfg(["task=nusax", "model=tiny-llama", "protocol=official"])
    config = OmegaConf.to_container(cfg, resolve=True)
    nusax = SimpleNamespace(qa=False, scoring="last_word", labels=labels)
    gold = ["negative", "positive", "neutral", "negative", "positive", "positive"]
    flare = [{"id": str(i), "gold": g, "prediction": p, "output": ""}
             for i, (g, p) in enumerate(zip(gold, ["negative", None, "neutral", None, "positive", "positive"]))]
    lora = [{**r, "prediction": p} for r, p in zip(flare, [None, "positive", "neutral", "negative", None, "neutral"])]
    (f, mf), (l, ml) = write("f", flare, config, nusax), write("l", lora, config, nusax)
    for metric in ("macro_f1", "accuracy"):
        assert paired_bootstrap(f, l, metric, samples=50)["difference"] == pytest.approx(100 * (mf[metric] - ml[metric]))
    assert mf["macro_f1"] != mf["accuracy"] and mf["invalid"] == 2
    # QA: an official decoder's decoded texts, an official encoder's token indices
    qa_gold = [["1999"], ["Rio"], ["two"]]
    texts = [{"text": "1999", "full": "Answer: 1999", "gold_full": "Answer: 1999"},
             {"text": "rio.", "full": "Answer: rio.", "gold_full": "Answer: Rio"},
             {"text": "the two", "full": "Answer: the two", "gold_full": "Answer: two"}]  # SQuAD EM would take it
    decoder = SimpleNamespace(qa=True, scoring="exact_match", token_index=False)
    rows = [{"id": str(i), "gold": g, "prediction": o["text"], "output": o} for i, (g, o) in enumerate(zip(qa_gold, texts))]
    misses = [{**r, "prediction": "x", "output": {**r["output"], "full": "Answer: x"}} for r in rows]
    (f, mf), (l, ml) = write("fq", rows, config, decoder), write("lq", misses, config, decoder)
    assert mf["exact_match"] == pytest.approx(2 / 3)
    assert paired_bootstrap(f, l, "exact_match", samples=50)["difference"] == pytest.approx(100 * (mf["exact_match"] - ml["exact_match"]))
    encoder = SimpleNamespace(qa=True, scoring=None, token_index=True)
    spans = [{"id": str(i), "gold": g, "prediction": g[0], "output": {"start": s, "end": s, "gold": [3, 3]}}
             for i, (g, s) in enumerate(zip(qa_gold, [3, 4, 4]))]  # the right text at other tokens misses
    (f, mf), (l, ml) = write("fs", spans, config, encoder), write("ls", [{**r, "output": {**r["output"], "start": 0}} for r in spans], config, encoder)
    assert paired_bootstrap(f, l, "exact_match", samples=50)["difference"] == pytest.approx(100 * (mf["exact_match"] - ml["exact_match"]))
    assert mf["exact_match"] == pytest.approx(1 / 3)


def test_the_table_names_the_official_bugs_its_numbers_carry(tmp_path, make_cfg):
    """Beneath a table of official runs, each official-code bug that changes some of them, with the
    rows it changes; a sound run, or an official run no bug applies to, adds nothing."""
    from omegaconf import OmegaConf

    from flare_exp.tables import bug_notes

    def results(name, overrides):
        path = tmp_path / name / "results.json"
        path.parent.mkdir()
        cfg = make_cfg(overrides, tmp_path)
        path.write_text(json.dumps({"config": OmegaConf.to_container(cfg, resolve=True)}))
        return path

    nusax = ["task=nusax", "lang=jav", "mt=gold", "model=xlmr-large"]
    official_tt = results("tt", [*nusax, "method=translate_test", "protocol=official"])
    official_lora = results("lora", [*nusax, "method=lora", "protocol=official"])
    sound_tt = results("sound", [*nusax, "method=translate_test"])
    qa = results("qa", ["task=tydiqa", "lang=sw", "mt=gold", "model=llama3.1-8b", "method=zero_shot", "protocol=official"])
    assert bug_notes([official_lora, sound_tt]) == ""
    notes = bug_notes([official_tt, official_lora, sound_tt, qa])
    assert "`protocol.nusax_translate_test` (xlmr-large translate_test): tasks/nusax.py" in notes
    assert "`protocol.qa_decoder_stage1` (llama3.1-8b zero_shot): models/base.py" in notes
    assert notes.count("* `protocol.") == 2
    # an official NusaX decoder run whose scoring read some golds as no label: counted beneath it
    llama = results("llama", ["task=nusax", "lang=jav", "mt=gold", "model=llama3.1-8b", "method=lora",
                              "protocol=official"])
    record = json.loads(llama.read_text())
    llama.write_text(json.dumps({**record, "metrics": {"accuracy": 0.5, "n": 400, "invalid": 30, "unread_gold": 34}}))
    notes = bug_notes([official_lora, llama])
    assert "`protocol.decoder_scoring` (llama3.1-8b lora): a test prompt cut" in notes
    assert notes.endswith("(at most 75); 34 of the 400 test items of these runs\n")
