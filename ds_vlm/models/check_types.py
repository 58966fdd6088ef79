"""`ds-vlm check-model --all_types`: the part of check-model that needs no processor, over every model type the
installed transformers maps to `AutoModelForImageTextToText`. For each: its default config shrunk as check-model
shrinks it, built on the meta device (no memory), then its adapter (its own, or the generic one) asked for the
towers (every parameter must belong to one) and whether packing keeps its attention exact. A processor and a
tokenizer are not built here, so no step is run: `ds-vlm check-model --model M` runs those for a model folder."""

from __future__ import annotations

import warnings


def check_type(model_type: str) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    from ds_vlm.memplan.trace import no_zero3_init
    from ds_vlm.models import adapter_for
    from ds_vlm.models.check_tiny import shrink
    from ds_vlm.models.loading import part_parameters

    row = {"model_type": model_type, "adapter": "", "parts": "", "packing": ""}
    try:
        adapter = adapter_for(model_type)
        row["adapter"] = type(adapter).__name__
        config = AutoConfig.for_model(model_type)
        shrink(config)
        with warnings.catch_warnings(), torch.device("meta"), no_zero3_init():
            warnings.simplefilter("ignore")
            model = AutoModelForImageTextToText.from_config(config)
    except Exception as err:  # noqa: BLE001 - reported per type
        row["parts"] = f"not built: {type(err).__name__}: {' '.join(str(err).split())[:160]}"
        return row
    try:
        groups = part_parameters(model, adapter)
        row["parts"] = "ok (" + ", ".join(f"{k} {sum(p.numel() for _, p in v) / 1e6:.1f}M" for k, v in groups.items()) \
            + ")"
    except Exception as err:  # noqa: BLE001 - UnsupportedModel names the missing piece
        row["parts"] = f"refused: {' '.join(str(err).split())[:200]}"
        return row
    refusal = adapter.packing_refusal(config)
    row["packing"] = f"refused: {refusal}" if refusal else "allowed (check-model --model checks packed == padded)"
    return row


def survey() -> list[dict]:
    from transformers.utils import logging

    from ds_vlm.models.generic import image_text_to_text_types

    logging.set_verbosity_error()
    return [check_type(t) for t in sorted(image_text_to_text_types())]


def markdown(rows: list[dict]) -> str:
    lines = ["| model type | adapter | towers | packing |", "|---|---|---|---|"]
    lines += [f"| `{r['model_type']}` | {r['adapter'] or '-'} | {r['parts'].replace('|', '/')} | "
              f"{r['packing'].replace('|', '/') or '-'} |" for r in rows]
    return "\n".join(lines)
