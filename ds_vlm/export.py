"""`python -m ds_vlm.export`, the same as `ds-vlm export`: a checkpoint -> a Hugging Face folder. The code is
ds_vlm/checkpoint/export.py; this module keeps the documented command working."""

import sys

from ds_vlm.checkpoint.export import main

if __name__ == "__main__":
    sys.exit(main())
