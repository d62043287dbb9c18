"""vlui: a browser demo for vision-language chat models. See README.md, or `python app.py --help`."""

import sys

from vlui.cli import main

if __name__ == "__main__":
    sys.exit(main())
