# make demo: set up .venv (when missing or stale) and train the quickstart on the embedded digits data.
# make test: set up .venv and run the test suite.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.requirements-stamp
REQS := requirements.txt

.PHONY: demo test venv clean-venv

$(STAMP): $(REQS)
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r $(REQS)
	@sha256sum $(REQS) > $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/python train.py -c configs/quickstart.yaml

test: $(STAMP)
	WANDB_MODE=offline $(VENV)/bin/python -m pytest -q tests

clean-venv:
	rm -rf $(VENV)
