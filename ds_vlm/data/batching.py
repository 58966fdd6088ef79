"""Encoded samples -> micro-batches: the dataset, the collator (padded rows or one packed row, the dummy
image and video that keep every rank's vision tower in step) and the loader that follows the batch plan."""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from ds_vlm.data.encode import IGNORE_INDEX, TOKEN_KEYS, Encoder, cat_rows, count_targets, merge_parts
from ds_vlm.data.formats import DataError
from ds_vlm.data.plan import BatchPlan
from ds_vlm.data.sources import RecordIndex

RECORD = "record"  # a sample's name ("FILE record I") beside its tensors, kept by the collator in MicroBatch.records


class SFTDataset(Dataset):
    """Encoded samples for the records listed in `indices` (the ones preflight kept; a numpy array, so that
    forked workers share it), each named under RECORD. With `skip_bad` (records preflight did not check), a bad
    record comes out as {"bad": its message}, which the collator leaves out and counts."""

    def __init__(self, records: RecordIndex, encoder: Encoder, indices=None, skip_bad: bool = False, checks=None):
        self.records, self.encoder, self.skip_bad = records, encoder, skip_bad
        self.checks = checks  # preflight's Checks of these records, when the trainer made it
        self.indices = np.arange(len(records)) if indices is None else np.asarray(indices, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        try:
            sample, encoded = self.encoder.encode_record(self.records, int(self.indices[i]))
            return {**encoded, RECORD: f"{sample.source} record {sample.index}"}
        except DataError as err:
            if not self.skip_bad:
                raise
            return {"bad": str(err)}


def open_records(spec: str, data) -> RecordIndex:
    """A data spec's records (`data`: the run's DataConfig), indexed: a file that is missing or unreadable as a
    whole raises here, before anything slow."""
    return RecordIndex(spec, data.image_root, data.data_format, data.data_cache, data.caption_prompt)


def preflighted(records: RecordIndex, spec: str, data, encoder: Encoder, log, show_progress: bool) -> SFTDataset:
    """The usable records of `records` (the data spec `spec`), as preflight found them (or as it left them:
    --preflight off); said, and the records left out logged as an event."""
    from ds_vlm.data.preflight import preflight, summarize, usable

    checks, said = preflight(records, encoder, data.preflight, data.data_cache, data.loader_workers,
                             progress=show_progress)
    log.info(f"preflight {spec}: {said}\n{summarize(checks)}")
    kept = usable(checks, data.bad_records, data.truncation, spec)
    if len(kept) < len(checks):
        log.event({"event": "skipped_records", "data": spec, "count": len(checks) - len(kept),
                   "kinds": {k: n for k, n in checks.select(checks.bad).counts().items()}})
    return SFTDataset(records, encoder, kept.index, skip_bad=data.preflight not in ("cached", "full"), checks=kept)


@dataclass
class MicroBatch:
    """One micro-batch: what the collator makes and the step consumes (nothing is taken out of it on the way).

    `inputs` are the model's forward arguments (token ids, attention mask or position ids, vision tensors);
    the counts are of real samples only (the dummy image or video and bad records left out), except
    `computed`, which is what the forward computes over (padding and dummies included)."""

    inputs: dict[str, torch.Tensor]
    labels: torch.Tensor                    # (rows, length): the label ids, IGNORE_INDEX elsewhere
    samples: int
    tokens: int
    targets: int                            # label tokens (next-token targets)
    computed: int
    sample_lengths: list[int]               # each attended span: a padded row's unpadded length, a packed segment
    cu_seq_lens: Optional[torch.Tensor] = None  # a packed row's sample boundaries (int32, on the host)
    max_length: int = 0                     # a packed row's longest sample
    bad: list[str] = field(default_factory=list)  # the messages of records left out for being bad
    records: list[str] = field(default_factory=list)  # the samples' records ("FILE record I"), to name in errors

    def pin_memory(self) -> "MicroBatch":
        """Called by the DataLoader's pinning thread on GPUs: copies to the device then run without waiting."""
        return dataclasses.replace(self, inputs={k: v.pin_memory() for k, v in self.inputs.items()},
                                   labels=self.labels.pin_memory(),
                                   cu_seq_lens=None if self.cu_seq_lens is None else self.cu_seq_lens.pin_memory())


PIXEL_KEYS = frozenset({"pixel_values", "pixel_values_videos"})


def refuse_packing(adapter, packing: bool, hf_config) -> None:
    """--packing where the model's layers cannot keep packed samples apart: a ConfigError saying why."""
    reason = adapter.packing_refusal(hf_config) if packing else ""
    if reason:
        from ds_vlm.config import ConfigError

        raise ConfigError(f"--packing: {reason}")


class Collator:
    """Samples -> one MicroBatch, padded to its longest sample (one row each) or, with `packing`, packed into
    one row: samples concatenated, each with its own positions (which restart at every sample: that is how
    attention is kept inside it) and the sample boundaries as `cu_seq_lens` for varlen kernels. `positions`:
    the adapter's per-sample position ids (needed for packing; for a padded batch they save the model from
    computing them on the device: Qwen's rope index reads token types back to the host per row). A micro-batch
    with no image gets the dummy image (padded: appended to the first sample; packed: as its own sample), all
    of its labels ignored. `model_inputs`: the adapter's last change to the collated tensors (Adapter.model_inputs),
    made after the positions."""

    def __init__(self, pad_token_id: int, dummy: dict[str, torch.Tensor], positions=None, multiple_of: int = 1,
                 dummy_video: Optional[dict[str, torch.Tensor]] = None, packing: bool = False,
                 pixel_dtype: torch.dtype = torch.float32, model_inputs=None):
        if packing and positions is None:
            raise ValueError("packing needs the adapter's position ids")
        self.pad_token_id = pad_token_id
        self.dummy = dummy
        self.dummy_video = dummy_video  # set when the data holds videos: every micro-batch then has one
        self.positions = positions
        self.packing = packing
        self.multiple_of = multiple_of  # --sequence_parallel: every row's length divides by it
        # the pixels in the model's dtype already in the worker: what the forward would cast them to anyway, at half
        # the bytes in /dev/shm (workers x prefetch x micro-batches of fp32 pixels ran to ~45 GB a rank)
        self.pixel_dtype = pixel_dtype
        self.model_inputs = model_inputs

    @classmethod
    def for_run(cls, encoder: Encoder, adapter, hf_config, batch, sp_size: int, datasets=(),
                pixel_dtype: torch.dtype = torch.float32) -> "Collator":
        """The run's collator (`batch`: its BatchConfig): the adapter's positions where packing or the family
        needs them, rows a multiple of the sequence-parallel size, and a dummy video riding along when some
        record of `datasets` has a video (or when nobody checked: --preflight off); never where the model takes
        a video's frames as images (`video_frames_as_images`: the dummy image runs the same modules)."""
        refuse_packing(adapter, batch.packing, hf_config)
        positions = adapter.position_ids(hf_config) if (batch.packing or adapter.padded_batch_positions) else None
        has_video = not adapter.video_frames_as_images and (
            any(bool(d.checks.n_video_tokens.any()) for d in datasets if d) or (
                bool(datasets) and datasets[0].skip_bad and encoder.video_token is not None))
        return cls(encoder.tokenizer.pad_token_id, encoder.dummy(), positions, multiple_of=max(1, sp_size),
                   packing=batch.packing, dummy_video=encoder.dummy_video() if has_video else None,
                   pixel_dtype=pixel_dtype, model_inputs=adapter.model_inputs)

    def __call__(self, samples: list[dict[str, torch.Tensor]]) -> MicroBatch:
        bad = [s["bad"] for s in samples if "bad" in s]
        records = [s[RECORD] for s in samples if RECORD in s]
        samples = [{k: v for k, v in s.items() if k != RECORD} for s in samples if "bad" not in s]
        counts = dict(bad=bad, records=records, samples=len(samples),
                      tokens=sum(int(s["input_ids"].shape[1]) for s in samples),
                      targets=sum(count_targets(s["labels"]) for s in samples))
        micro = self._pack(samples, counts) if self.packing else self._pad(samples, counts)
        for key in PIXEL_KEYS & micro.inputs.keys():
            micro.inputs[key] = micro.inputs[key].to(self.pixel_dtype)
        if self.model_inputs is not None:
            micro.inputs = self.model_inputs(micro.inputs)
        return micro

    def _pad(self, samples: list[dict[str, torch.Tensor]], counts: dict) -> MicroBatch:
        for dummy in self._dummies(samples):
            samples = [merge_parts([samples[0], dummy])] + samples[1:] if samples else [dict(dummy)]
        length = _round_up(max(s["input_ids"].shape[1] for s in samples), self.multiple_of)
        batch: dict[str, list[torch.Tensor]] = {}
        for s in samples:
            if self.positions is not None:
                s = dict(s, position_ids=self.positions(s))
            for key, value in s.items():
                if key in TOKEN_KEYS or key == "position_ids":
                    value = torch.nn.functional.pad(value, (0, length - value.shape[-1]), value=self._pad_value(key))
                batch.setdefault(key, []).append(value)
        inputs = {key: torch.cat(values, dim=-2 if key == "position_ids" else 0) if key in TOKEN_KEYS or
                  key == "position_ids" else cat_rows(values) for key, values in batch.items()}
        return MicroBatch(inputs, inputs.pop("labels"), computed=length * len(samples),
                          sample_lengths=[int(s["input_ids"].shape[1]) for s in samples], **counts)

    def _dummies(self, samples: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
        """What the micro-batch needs so that the vision tower runs on an image (and a video) on every rank."""
        needed = [] if any("pixel_values" in s for s in samples) else [self.dummy]
        if self.dummy_video is not None and not any("pixel_values_videos" in s for s in samples):
            needed.append(self.dummy_video)
        return needed

    def _pack(self, samples: list[dict[str, torch.Tensor]], counts: dict) -> MicroBatch:
        samples = samples + self._dummies(samples)
        total = sum(int(s["input_ids"].shape[1]) for s in samples)
        padding = _round_up(total, self.multiple_of) - total
        if padding:  # a segment of its own at the end: nothing attends to it, it has no label
            samples.append(self._padding(samples[0], padding))
        parts, positions = [], []
        for sample in samples:
            part = {k: v for k, v in sample.items() if k != "attention_mask"}  # no mask: attention is per sample
            part["labels"] = part["labels"].clone()
            part["labels"][:, 0] = IGNORE_INDEX  # the previous sample's last token never predicts this one
            parts.append(part)
            positions.append(self.positions(sample))
        lengths = [int(s["input_ids"].shape[1]) for s in samples]
        inputs = merge_parts(parts)
        inputs["position_ids"] = torch.cat(positions, dim=-1)
        return MicroBatch(inputs, inputs.pop("labels"), computed=sum(lengths), sample_lengths=lengths,
                          cu_seq_lens=torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32),
                          max_length=max(lengths), **counts)

    def _pad_value(self, key: str) -> int:
        return {"input_ids": self.pad_token_id, "labels": IGNORE_INDEX}.get(key, 0)

    def _padding(self, like: dict[str, torch.Tensor], length: int) -> dict[str, torch.Tensor]:
        """A text-only segment of `length` pad tokens, with the per-token keys of `like`."""
        return {key: torch.full((1, length), self._pad_value(key), dtype=value.dtype)
                for key, value in like.items() if key in TOKEN_KEYS}


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _worker_init(_):
    from ds_vlm.runtime.faults import ignore_stop_signals

    torch.set_num_threads(1)
    ignore_stop_signals()


class _MicroBatches:
    """This data-parallel rank's micro-batches from `start` to `steps`, made as they are read (a
    million-record epoch is never held as lists)."""

    def __init__(self, plan: BatchPlan, rank: int, start: int, steps: int):
        self.plan, self.rank, self.start, self.steps = plan, rank, start, steps

    def __iter__(self):
        return self.plan.iterate(self.rank, self.start, self.steps)

    def __len__(self) -> int:
        return (self.steps - self.start) * self.plan.grad_accum


def make_loader(dataset, plan: BatchPlan, dp_rank: int, start: int, steps: int, collator, num_workers: int,
                prefetch: int = 2):
    """The micro-batches of data-parallel rank `dp_rank` from step `start` to `steps`, collated in
    `num_workers` workers, each `prefetch` micro-batches ahead (pinned on GPUs)."""
    from torch.utils.data import DataLoader

    # its own generator: creating the iterator draws a seed, which from the global RNG would shift every later
    # random draw (LoRA dropout) of a resumed run against the uninterrupted one
    return DataLoader(dataset, batch_sampler=_MicroBatches(plan, dp_rank, start, steps), collate_fn=collator,
                      num_workers=num_workers, worker_init_fn=_worker_init if num_workers else None,
                      pin_memory=torch.cuda.is_available(), persistent_workers=False,
                      prefetch_factor=prefetch if num_workers else None,
                      generator=torch.Generator().manual_seed(start))


def fit_to_shm(num_workers: int, prefetch: int, micro_batch_bytes: float, shm_free: float) -> tuple[int, int, str]:
    """(workers, prefetch, what was changed) such that the micro-batches the workers hold in /dev/shm (workers x
    prefetch x the largest micro-batch) fit in half of its free space: a full /dev/shm kills a worker with a bus
    error mid-run (a container's default is 64 MB). Fewer batches in flight first, then fewer workers; said."""
    if num_workers == 0 or micro_batch_bytes <= 0:
        return num_workers, prefetch, ""
    room = int(0.5 * shm_free // micro_batch_bytes)
    if num_workers * prefetch <= room:
        return num_workers, prefetch, ""
    prefetch_fit = max(1, room // num_workers)
    workers = num_workers if room >= num_workers else max(0, room)
    said = (f"/dev/shm has {shm_free / 1e9:.1f} GB free and a micro-batch takes up to "
            f"{micro_batch_bytes / 1e9:.2f} GB: {workers} loader workers x {prefetch_fit if workers else 0} batches "
            f"in flight (was {num_workers} x {prefetch}); a larger /dev/shm (docker --shm-size) gives them back")
    return workers, prefetch_fit if workers else prefetch, said


def loader_settings(config, dummy: dict[str, torch.Tensor], image_token_id: int,
                    pixel_dtype: torch.dtype) -> tuple[int, int, str]:
    """The run's (loader workers, micro-batches each holds ahead, what was changed): --num_workers and 2, fitted to
    /dev/shm for the largest micro-batch (its token budget, every token an image token, at the pixel bytes per
    image token of the family's dummy image: the collator's `dummy`)."""
    import os
    import shutil

    batch, workers = config.batch, config.data.loader_workers
    if not workers or not os.path.isdir("/dev/shm"):
        return workers, 2, ""
    tokens = batch.max_tokens_per_batch if batch.max_tokens_per_batch > 0 else batch.micro_batch_size * \
        config.data.max_length
    image_tokens = max(1, int((dummy["input_ids"] == image_token_id).sum()))
    per_token = dummy["pixel_values"].numel() * pixel_dtype.itemsize / image_tokens
    return fit_to_shm(workers, 2, tokens * per_token, shutil.disk_usage("/dev/shm").free)
