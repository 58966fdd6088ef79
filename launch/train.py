#!/usr/bin/env python
"""Entry point: deepspeed --num_gpus N launch/train.py --config F.yaml [--flag value ...]"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ds_vlm.cli import main  # noqa: E402

if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip C++ static destructors: at interpreter teardown a DeepSpeed/gloo thread occasionally
    # aborts a finished run ("terminate called without an active exception", exit 250).
    os._exit(code)
