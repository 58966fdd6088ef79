"""ds-vlm: DeepSpeed-native supervised fine-tuning of vision-language models."""

from ds_vlm.patches.environment import apply_import_defaults

# before anything imports DeepSpeed: where its ops build, and a CPU machine said to be one (patches/environment.py)
apply_import_defaults()
