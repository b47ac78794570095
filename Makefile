# `make demo` and `make test` set up .venv once (a stamp file records the install) and reuse it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install models clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check "torch==2.13.0" -e ".[cpu,dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/verifier inspect models/digits_mlp_relu.onnx
	$(BIN)/verifier validate models/digits_mlp_relu.onnx --data models/digits_test.npz

test: $(STAMP)
	$(BIN)/python -m pytest -q

models: $(STAMP)
	$(BIN)/python tools/make_models.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis verifier-report
