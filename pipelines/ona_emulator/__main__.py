"""`python -m ona_emulator [options]`."""

import sys

from .cli import cli_main


def main() -> None:
    sys.exit(cli_main(sys.argv[1:]))


if __name__ == "__main__":
    main()
