# The README's two commands (scripts/dev.sh sets up .venv once, then runs them).
.PHONY: quickstart test test-fast setup lock
quickstart:
	bash scripts/dev.sh quickstart
test:
	bash scripts/dev.sh test
test-fast:
	bash scripts/dev.sh test -m "not slow"
setup:
	bash scripts/dev.sh setup dev
lock:
	bash scripts/dev.sh lock
