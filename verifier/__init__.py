"""verifier: robustness certificates and distributional attacks for ONNX classifiers.

The pipeline (docs/architecture.md): `load_model` -> `OperatorGraph` / `find_activations` ->
`convert_model` -> `validate_against_onnxruntime`; later stages build on the converted model.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
