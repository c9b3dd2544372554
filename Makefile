# Two commands do all the set-up on a fresh machine with python3:
#   make demo   create .venv, install requirements.txt, run the demo job
#   make test   create .venv, install requirements.txt, run the test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO := results/demo

.PHONY: demo demo-extract test test-fast lint browser docs-images clean
# The viewer's browser test runs Debian's chromium; root installs it directly, others via sudo.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $(STAMP)

# The main job: the Snakemake workflow over the demo corpus x 4 checkpoints (configs/demo.yaml).
# The local profile gives 2 cores and --rerun-incomplete (a killed demo continues where it was).
demo: $(STAMP)
	$(PY) -m snakemake --profile configs/profiles/local --configfile configs/demo.yaml
	@echo "report: results/demo/report.md"

# The extraction stage alone, plus a figure, the HTML view, metrics and a report for MiniLM.
demo-extract: $(STAMP)
	mkdir -p $(DEMO)/extract
	$(PY) extract_attention.py --texts-file data/demo_corpus.jsonl --max-length 128 \
		--dtype float16 --verify --output_file $(DEMO)/extract/attention.h5
	$(PY) extract_attention.py --text "The cat sat on the mat because it was warm." \
		--verify --output_file $(DEMO)/extract/attention_data.json
	$(PY) visualize_attention.py --input_file $(DEMO)/extract/attention_data.json --mode heads --layer -1 \
		--output_file $(DEMO)/extract/attention_heads_last.png
	$(PY) visualize_attention.py --input_file $(DEMO)/extract/attention.h5 --text-id amb-001 --mode html \
		--output_file $(DEMO)/extract/attention_interactive.html
	$(PY) analyze_attention.py metrics $(DEMO)/extract/attention.h5 --output-dir $(DEMO)/extract/metrics
	$(PY) analyze_attention.py report $(DEMO)/extract/attention.h5 --output-dir $(DEMO)/extract/report

test: $(STAMP) browser lint
	$(PY) -m pytest

# ruff's rules are in pyproject.toml ([tool.ruff]); .ci/run runs it through make test
lint: $(STAMP)
	$(PY) -m ruff check .

browser:
	@test -x /usr/bin/chromium -a -x /usr/bin/chromedriver || { \
		$(SUDO) apt-get update && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y chromium chromium-driver; }

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow"

# The README's pictures, made from the packaged MiniLM (kept small: ~100 dpi).
IMG := docs/img
docs-images: $(STAMP)
	mkdir -p $(IMG) results
	$(PY) extract_attention.py --text "The cat sat on the mat because it was warm." -q \
		--output_file results/readme_attention.json
	$(PY) visualize_attention.py --input_file results/readme_attention.json --mode plot --layer 2 --head 0 \
		--dpi 90 --output_file $(IMG)/plot.png
	$(PY) visualize_attention.py --input_file results/readme_attention.json --mode heads --layer 2 \
		--dpi 70 --output_file $(IMG)/heads.png
	$(PY) visualize_attention.py --input_file results/readme_attention.json --mode layers \
		--dpi 70 --output_file $(IMG)/layers.png
	$(PY) visualize_attention.py --input_file results/readme_attention.json --mode average --layer all \
		--dpi 85 --output_file $(IMG)/average.png

clean:
	rm -rf $(VENV) results
