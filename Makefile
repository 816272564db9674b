# Both targets create and reuse .venv; nothing is downloaded at run time.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-heavy install clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch and torchvision come together from the index so their builds match.
	$(PY) -m pip install --quiet torch torchvision
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m fxsearch.demo

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile

# one process: the largest zoo models need about 12 GB each
test-heavy: $(STAMP)
	$(PY) -m pytest -q -m heavy

clean:
	rm -rf $(VENV) build *.egg-info
