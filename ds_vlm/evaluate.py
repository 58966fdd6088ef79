"""`python -m ds_vlm.evaluate`, the same as `ds-vlm evaluate`: generate on records and score the answers. The code is
ds_vlm/eval/cli.py; this module keeps the documented command working."""

import sys

from ds_vlm.eval.cli import main

if __name__ == "__main__":
    sys.exit(main())
