"""`python -m ds_vlm.validate`, the same as `ds-vlm validate`: check a dataset before booking GPUs. The code is
ds_vlm/data/validate.py; this module keeps the documented command working."""

import sys

from ds_vlm.data.validate import main

if __name__ == "__main__":
    sys.exit(main())
