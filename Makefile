.PHONY: setup main test bench
setup:
	scripts/setup.sh
main:
	scripts/main.sh
test:
	scripts/test.sh
