"""ds-vlm: DeepSpeed-native supervised fine-tuning of vision-language models."""

import os
import sys

# DeepSpeed JIT-builds its ops into TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions, shared by every
# install on the machine: two venvs then rebuild each other's ops on every start and wait on each other's
# build locks). Unless the user chose a folder, keep the builds inside this environment.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
