#!/usr/bin/env python
"""Entry point: deepspeed --num_gpus N launch/train.py --config F.yaml [--flag value ...]"""

import os
import sys

from ds_vlm.cli import main

if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip C++ static destructors: at interpreter teardown a DeepSpeed/gloo thread occasionally
    # aborts a finished run ("terminate called without an active exception", exit 250).
    os._exit(code)
