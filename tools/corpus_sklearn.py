"""scikit-learn members of the corpus: models trained on datasets bundled with scikit-learn, exported by skl2onnx.

Nothing is downloaded: `load_digits` and `load_wine` ship inside scikit-learn.

- digits (`skl-logreg`, `skl-mlp`, `skl-forest`): pixels scaled to [0, 1]; the first 1500 rows
  train, the rest are the held-out sample; one input `X`.
- wine with two column groups (`skl-columns-logreg`, `skl-columns-mlp`): the 178 rows shuffled
  (seed 0), the first 130 train, the rest are held out. Two of the 13 measurements become
  integer categories, as a user bins a feature before one-hot encoding it: alcohol by its
  quartiles (0..3) and colour intensity by its terciles (0..2), thresholds from the training
  rows. The other 11 stay numeric, min-max scaled to [0, 1] over the whole dataset (so the box
  [0, 1] holds every row). The model is `Pipeline(ColumnTransformer(StandardScaler on the
  numeric columns, OneHotEncoder on the categorical ones), classifier)`, exported the way
  skl2onnx's documentation does it: one named input per column group, `numeric` (float32, 11)
  and `categorical` (int64, 2).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

TRAIN_ROWS = 1500
WINE_TRAIN_ROWS = 130
WINE_BINNED = {0: (0.25, 0.5, 0.75), 9: (1 / 3, 2 / 3)}  # feature index: quantiles that bin it
WINE_INPUTS = ("numeric", "categorical")


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


def wine_columns() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(numeric float32 (178, 11) in [0, 1], categorical int64 (178, 2), labels), shuffled (seed 0)."""
    from sklearn.datasets import load_wine

    wine = load_wine()
    order = np.random.default_rng(0).permutation(len(wine.target))
    x, y = wine.data[order], wine.target[order].astype(np.int64)
    train = x[:WINE_TRAIN_ROWS]
    categorical = np.stack([np.digitize(x[:, f], np.quantile(train[:, f], q)) for f, q in WINE_BINNED.items()], 1)
    numeric = np.delete(x, list(WINE_BINNED), axis=1)
    low, high = numeric.min(0), numeric.max(0)
    return ((numeric - low) / (high - low)).astype(np.float32), categorical.astype(np.int64), y


def columns_holdout(rows: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The first `rows` held-out wine rows as the model's inputs by name, and their true labels."""
    numeric, categorical, y = wine_columns()
    held = slice(WINE_TRAIN_ROWS, WINE_TRAIN_ROWS + rows)
    return {"numeric": numeric[held], "categorical": categorical[held]}, y[held]


def estimator(name: str):
    """The untrained estimator behind a corpus entry name (the classifier of a column pipeline)."""
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier

    estimators = {
        "skl-logreg": lambda: LogisticRegression(max_iter=2000),
        "skl-mlp": lambda: MLPClassifier(hidden_layer_sizes=(64,), max_iter=400, random_state=0),
        "skl-forest": lambda: RandomForestClassifier(n_estimators=20, max_depth=8, random_state=0),
        "skl-columns-logreg": lambda: LogisticRegression(max_iter=2000),
        "skl-columns-mlp": lambda: MLPClassifier(hidden_layer_sizes=(32,), max_iter=2000, random_state=0),
    }
    return estimators[name]()


def column_pipeline(classifier, numeric_columns: int, categories: list[np.ndarray]):
    """`Pipeline(ColumnTransformer(StandardScaler | OneHotEncoder), classifier)` over the columns
    `[numeric..., categorical...]` of one array."""
    from sklearn.compose import ColumnTransformer
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    categorical = list(range(numeric_columns, numeric_columns + len(categories)))
    columns = ColumnTransformer([("numeric", StandardScaler(), list(range(numeric_columns))),
                                 ("categorical", OneHotEncoder(categories=categories, handle_unknown="ignore"),
                                  categorical)])
    return Pipeline([("columns", columns), ("classifier", classifier)])


def export_columns(pipeline, numeric: np.ndarray, categorical: np.ndarray, opset: int = 17) -> bytes:
    """skl2onnx's export of a fitted column pipeline with one input per column group."""
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType, Int64TensorType

    types = [(WINE_INPUTS[0], FloatTensorType([None, numeric.shape[1]])),
             (WINE_INPUTS[1], Int64TensorType([None, categorical.shape[1]]))]
    return convert_sklearn(pipeline, initial_types=types, target_opset=opset).SerializeToString()


def export_sklearn(name: str, target: Path) -> None:
    """Train the entry's estimator and write skl2onnx's default export to `target`."""
    from skl2onnx import to_onnx

    if name.startswith("skl-columns-"):
        numeric, categorical, y = wine_columns()
        categories = [np.arange(len(q) + 1) for q in WINE_BINNED.values()]
        pipeline = column_pipeline(estimator(name), numeric.shape[1], categories)
        train = slice(0, WINE_TRAIN_ROWS)
        pipeline.fit(np.hstack([numeric, categorical])[train].astype(np.float64), y[train])
        target.write_bytes(export_columns(pipeline, numeric[train], categorical[train]))
        return
    x_train, y_train, _, _ = digits_split()
    model = estimator(name).fit(x_train, y_train)
    proto = to_onnx(model, x_train[:1], target_opset=17)
    target.write_bytes(proto.SerializeToString())
