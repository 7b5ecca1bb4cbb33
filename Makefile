# make demo: set up .venv (when missing or stale) and train the quickstart on the embedded digits data.
# make test: set up .venv (plus the TFDS lane, requirements-tfds.txt) and run the test suite.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.requirements-stamp
REQS := requirements.txt
TFDS_REQS := requirements-tfds.txt
TFDS_STAMP := $(VENV)/.requirements-tfds-stamp

.PHONY: demo test venv clean-venv

$(STAMP): $(REQS)
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r $(REQS)
	@sha256sum $(REQS) > $(STAMP)

# the TFDS lane installs into the same venv, after (and whenever) the base requirements change
$(TFDS_STAMP): $(TFDS_REQS) $(STAMP)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r $(TFDS_REQS)
	@sha256sum $(TFDS_REQS) > $(TFDS_STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/python train.py -c configs/quickstart.yaml

test: $(STAMP) $(TFDS_STAMP)
	WANDB_MODE=offline $(VENV)/bin/python -m pytest -q tests

clean-venv:
	rm -rf $(VENV)
