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

# A full audit of the shipped ReLU digits MLP: 200 test digits, W_2 budgets 1/255 .. 8/255 in the
# l_inf threat norm, pixels in [0, 1]; gates: certified risk <= 1.5, certified accuracy >= 50 %.
demo: $(STAMP)
	$(BIN)/verifier audit models/digits_mlp_relu.onnx --data models/digits_test.npz --samples 200 \
		--box 0,1 --max-risk 1.5 --min-certified-accuracy 0.5 --out verifier-report
	@echo "open verifier-report/report.html in a browser (report.json and report.md are next to it)"

test: $(STAMP)
	$(BIN)/python -m pytest -q

models: $(STAMP)
	$(BIN)/python tools/make_models.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis verifier-report
