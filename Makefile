# Two entry points: `make demo` (the main job on the demo data) and `make test`.
PY      := .venv/bin/python
PIP     := .venv/bin/pip
STAMP   := .venv/.installed
DEMOOUT := demo_out

.PHONY: install demo test lint clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	python3 -m venv .venv
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

demo: install
	$(PY) -m c2f_med.demo --out $(DEMOOUT)

lint: install
	.venv/bin/ruff check .

test: lint
	$(PY) -m pytest -q

clean:
	rm -rf $(DEMOOUT)
