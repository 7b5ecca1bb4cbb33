# make demo: set up .venv (when missing or stale) and train the quickstart on the embedded digits data.
# make test: set up .venv (plus the TFDS lane, requirements-tfds.txt, and the benchmarks' torchattacks peer in
#   benchmarks/.peer) and run the test suite.
# make test-slow: the integration lane (notebooks, adversarial training end to end, real-process kills and signals,
#   two-process torchrun runs, AutoAttack and APGD-CE against pyautoattack, the heavier benchmark runs), a separate CI step.
# make test-tfds: the TFDS lane (tfds-marked tests: builders, tfds/ data in the CLIs), a separate CI step.
# make test-tfds-cli: install apache-beam for TFDS's `tfds` command into .tfds-cli and run `tfds build` from
#   each builder folder.
# make test-xla: set up .venv-tpu (torch 2.9 + torch-xla 2.9, requirements-xla.txt) and run the xla-marked tests
#   on PJRT's CPU backend (no TPU needed).
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.requirements-stamp
REQS := requirements.txt
TFDS_REQS := requirements-tfds.txt
TFDS_STAMP := $(VENV)/.requirements-tfds-stamp

.PHONY: demo test test-slow test-tfds test-tfds-cli test-xla venv clean-venv

$(STAMP): $(REQS)
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r $(REQS)
	@sha256sum $(REQS) > $(STAMP)

# the TFDS lane installs into the same venv, after (and whenever) the base requirements change
$(TFDS_STAMP): $(TFDS_REQS) $(STAMP)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r $(TFDS_REQS)
	@sha256sum $(TFDS_REQS) > $(TFDS_STAMP)

# the benchmarks' peer (torchattacks), without its dependencies, into benchmarks/.peer (its requests pin
# conflicts with ours); tests/test_benchmarks_smoke.py runs the side-by-side comparison with it
PEER_REQS := benchmarks/requirements-bench.txt
PEER_STAMP := benchmarks/.peer/.requirements-stamp

$(PEER_STAMP): $(PEER_REQS) $(STAMP)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check --no-deps --upgrade --target benchmarks/.peer -r $(PEER_REQS)
	@sha256sum $(PEER_REQS) > $(PEER_STAMP)

# TFDS's `tfds build` command needs apache-beam, whose pins conflict with ours: its own folder, seen only through
# PYTHONPATH by that command (tests/test_tfds_cli.py runs it from a builder folder)
TFDS_CLI_REQS := requirements-tfds-cli.txt
TFDS_CLI_STAMP := .tfds-cli/.requirements-stamp

$(TFDS_CLI_STAMP): $(TFDS_CLI_REQS) $(TFDS_STAMP)
	rm -rf .tfds-cli
	$(VENV)/bin/pip install --quiet --disable-pip-version-check --target .tfds-cli -r $(TFDS_CLI_REQS)
	@sha256sum $(TFDS_CLI_REQS) > $(TFDS_CLI_STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/python train.py -c configs/quickstart.yaml

test: $(STAMP) $(TFDS_STAMP) $(PEER_STAMP)
	WANDB_MODE=offline $(VENV)/bin/python -m pytest -q -m "not xla and not tfds and not tfds_cli and not slow" tests

# the integration lane: the notebooks executed top to bottom, adversarial training end to end (a separate CI step)
test-slow: $(STAMP)
	WANDB_MODE=offline $(VENV)/bin/python -m pytest -q -m "slow" tests

# the TFDS lane: the builders, tfds/ data in every CLI, TFDS's build command (about 4-6 minutes on 2 cores)
test-tfds: $(STAMP) $(TFDS_STAMP)
	WANDB_MODE=offline $(VENV)/bin/python -m pytest -q -m "tfds and not tfds_cli" tests

# TFDS's own `tfds build` from each builder folder (about 2 minutes: every command starts TensorFlow and torch)
test-tfds-cli: $(STAMP) $(TFDS_STAMP) $(TFDS_CLI_STAMP)
	WANDB_MODE=offline $(VENV)/bin/python -m pytest -q -m tfds_cli tests/test_tfds_cli.py

clean-venv:
	rm -rf $(VENV)

XLA_VENV := .venv-tpu
XLA_STAMP := $(XLA_VENV)/.requirements-stamp
XLA_REQS := requirements-xla.txt

$(XLA_STAMP): $(XLA_REQS)
	@test -x $(XLA_VENV)/bin/python || $(PYTHON) -m venv $(XLA_VENV)
	$(XLA_VENV)/bin/pip install --quiet --disable-pip-version-check -r $(XLA_REQS)
	@sha256sum $(XLA_REQS) > $(XLA_STAMP)

test-xla: $(XLA_STAMP)
	WANDB_MODE=offline PJRT_DEVICE=CPU $(XLA_VENV)/bin/python -m pytest -q -m xla tests/test_xla_lane.py
