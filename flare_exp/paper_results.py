"""The FLARE paper's published averages over target languages (ACL 2025), in percent: XNLI
accuracy, TyDiQA-GoldP exact match, NusaX macro-F1. The rows our paper tables line up against."""

COLUMNS = ("zero_shot", "translate_test", "lora", "xmixup", "input_fusion", "flare_mt", "flare")  # the paper's

_TABLES = {
    "xnli": {
        "xlmr-large": (76.95, 77.13, 80.49, 79.47, 77.24, 81.60, 80.99),
        "mt5-xl": (77.92, 79.03, 79.79, 79.63, 78.81, 80.80, 81.00),
        "llama3.1-8b": (77.40, 79.08, 80.74, 80.22, 80.70, 80.83, 80.92),
        "gemma2-9b": (80.47, 79.99, 84.89, 84.62, 80.53, 84.84, 85.01),
    },
    "tydiqa": {
        "xlmr-large": (36.31, 41.06, 40.14, 38.24, 40.45, 38.88, 40.93),
        "mt5-xl": (45.90, 47.92, 46.76, 48.23, 47.58, 48.48, 49.34),
        "llama3.1-8b": (2.36, 2.53, 42.84, 17.47, 46.09, 38.95, 47.74),
        "gemma2-9b": (2.46, 2.28, 49.93, 35.45, 51.29, 49.63, 52.14),
    },
    "nusax": {
        "xlmr-large": (75.26, 74.85, 77.00, 76.37, 78.53, 77.18, 79.18),
        "mt5-xl": (74.72, 75.77, 80.41, 78.61, 80.12, 81.37, 80.54),
        "llama3.1-8b": (71.74, 72.67, 74.76, 75.91, 74.60, 74.52, 76.08),
        "gemma2-9b": (71.61, 71.61, 79.37, 79.94, 77.98, 78.09, 80.86),
    },
}


def paper_value(task: str, model: str, method: str) -> float | None:
    """The paper's average for (task, model, method), or None where it reports none."""
    row = _TABLES.get(task, {}).get(model)
    return dict(zip(COLUMNS, row)).get(method) if row is not None else None
