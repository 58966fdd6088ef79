"""`python -m ds_vlm.plan`, the same as `ds-vlm plan`: the memory planner. The code is
ds_vlm/memplan/cli.py (the library: planner.py); this module keeps the documented command working."""

import sys

from ds_vlm.memplan.cli import main

if __name__ == "__main__":
    sys.exit(main())
