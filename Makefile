# Everyday verbs. Everything runs from the virtualenv that scripts/setup.sh makes.
VENV := .venv/bin
.PHONY: setup check test demo proto bench clean

setup:
	bash scripts/setup.sh

check: setup
	$(VENV)/ruff check .
	$(VENV)/ruff format --check .
	$(VENV)/mypy
	$(VENV)/lint-imports

test:
	bash scripts/test.sh

demo:
	bash scripts/demo.sh

proto:
	bash scripts/gen-proto.sh

bench: setup
	$(VENV)/python -m bench

clean:
	rm -rf .venv build *.egg-info test-artifacts .mypy_cache .ruff_cache
