.PHONY: setup main test
setup:
	scripts/setup.sh
main:
	scripts/main.sh
test:
	scripts/test.sh
