"""scikit-learn members of the corpus: models trained on sklearn's bundled digits, exported by skl2onnx.

Nothing is downloaded: `load_digits` ships inside scikit-learn. Pixels are scaled to [0, 1];
the first 1500 rows train, the rest are the held-out sample.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

TRAIN_ROWS = 1500


def digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_test, y_test), float32 pixels in [0, 1]."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    return x[:TRAIN_ROWS], y[:TRAIN_ROWS], x[TRAIN_ROWS:], y[TRAIN_ROWS:]


def digits_holdout(rows: int) -> tuple[np.ndarray, np.ndarray]:
    """The first `rows` held-out digits and their true labels."""
    _, _, x, y = digits_split()
    return x[:rows], y[:rows]


def estimator(name: str):
    """The untrained estimator behind a corpus entry name."""
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier

    estimators = {
        "skl-logreg": lambda: LogisticRegression(max_iter=2000),
        "skl-mlp": lambda: MLPClassifier(hidden_layer_sizes=(64,), max_iter=400, random_state=0),
        "skl-forest": lambda: RandomForestClassifier(n_estimators=20, max_depth=8, random_state=0),
    }
    return estimators[name]()


def export_sklearn(name: str, target: Path) -> None:
    """Train the entry's estimator on the digits and write skl2onnx's default export to `target`."""
    from skl2onnx import to_onnx

    x_train, y_train, _, _ = digits_split()
    model = estimator(name).fit(x_train, y_train)
    proto = to_onnx(model, x_train[:1], target_opset=17)
    target.write_bytes(proto.SerializeToString())
