# Two commands do all the set-up on a fresh machine with python3:
#   make demo   create .venv, install requirements.txt, run the demo job
#   make test   create .venv, install requirements.txt, run the test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO := results/demo

.PHONY: demo test test-fast clean

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $(STAMP)

demo: $(STAMP)
	mkdir -p $(DEMO)
	$(PY) extract_attention.py --texts-file data/demo_corpus.jsonl --max-length 128 \
		--dtype float16 --verify --output_file $(DEMO)/attention.h5
	$(PY) extract_attention.py --text "The cat sat on the mat because it was warm." \
		--verify --output_file $(DEMO)/attention_data.json

test: $(STAMP)
	$(PY) -m pytest

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow"

clean:
	rm -rf $(VENV) results
