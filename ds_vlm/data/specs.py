"""Data specs -> sources: the grammar of --train_data, and the mixture files other projects ship.

    --train_data SOURCE[#SELECTOR][:WEIGHT],...

SOURCE is a data file or folder (sources.py reads it), a hub dataset `hf:ORG/NAME` (#SELECTOR: its split,
default train; read through `datasets.load_dataset`, cached where datasets caches, HF_DATASETS_OFFLINE
honoured; `hf:/a/folder` in the hub's layout is read the same way), or a file that names several:
- a LLaMA-Factory `dataset_info.json`, with #NAME the entry to read (`file_name`, `formatting` sharegpt or
  alpaca, `columns`, `tags`, `num_samples`; paths relative to the file's folder, images too). An entry with
  `hf_hub_url` is read as hf:ORG/NAME (its `split`, default train); one with only `ms_hub_url`/`script_url`,
  or a `ranking` (preference) entry, is refused by name;
- an InternVL meta JSON ({name: {root, annotation, repeat_time, length}}): every entry (or #NAME's) is a
  source with its own image root; `repeat_time` repeats its records in each epoch (0.5: half of them, drawn
  anew each epoch);
- a LLaVA-NeXT mixture YAML (`datasets: [{json_path, sampling_strategy}]`).
SELECTOR on a data file is a sampling strategy, applied once when the data is opened: `all`, `first:N`,
`end:N`, `random:N` (seeded), N a count (`5000`, `5k`, `1m`) or a share (`50%`); LLaVA-NeXT's
`sampling_strategy` is the same. WEIGHT is a trailing `:number` only (a selector always has its own
`:N` before it, and a name has no colon), so it is never read as part of a name or path; weights set the
sources' shares of each epoch as before, and cannot be combined with a mixture file's own repeats.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from ds_vlm.data.containers import DataFileError, check_text

_SELECT = re.compile(r"(all|(first|end|random):(\d+(?:\.\d+)?)([kKmM%]?))")
_ITEM = re.compile(r"(?P<source>[^#]+?)(?:#(?P<selector>(?:first|end|random):[\d.]+[kKmM%]?|[^:#]+))?"
                   r"(?::(?P<weight>[0-9]*\.?[0-9]+(?:[eE][-+]?\d+)?))?")
HUB_PREFIX = "hf:"
_HUB_KEYS = ("hf_hub_url", "ms_hub_url", "script_url", "om_hub_url")


class SpecError(ValueError):
    """A data spec or mixture file that cannot be read, named."""


@dataclass
class Source:
    """One data file or folder as a part of the training data."""

    path: str
    weight: Optional[float] = None
    select: str = "all"             # all | first:N | end:N | random:N (see the module's docstring)
    repeat: float = 1.0             # draws per record and epoch (InternVL's repeat_time)
    image_root: str = ""            # "" : --image_root, else the data file's folder
    columns: Optional[dict] = None  # a LLaMA-Factory entry: {"formatting", "columns", "tags"}
    split: str = ""                 # a hub dataset's split (hf:ORG/NAME#SPLIT)
    name: str = ""                  # the entry it came from, for messages
    origin: str = ""                # the mixture file it came from
    placement: str = ""             # how images with no placeholder are placed: "internvl" (formats.PLACED)

    @property
    def tag(self) -> str:
        """What, besides the file, decides its records and their reading (part of the preflight cache key)."""
        if self.select == "all" and not self.image_root and not self.columns and not self.placement:
            return ""
        return json.dumps([self.select, self.image_root, self.columns] + ([self.placement] if self.placement else []),
                          sort_keys=True)


def parse_spec(spec: str) -> list[Source]:
    """'a.jsonl:0.7,info.json#name:0.3' -> sources, mixture files expanded into their entries."""
    sources: list[Source] = []
    items = [part.strip() for part in spec.split(",") if part.strip()]
    for item in items:
        match = _ITEM.fullmatch(item)
        if not match:
            raise SpecError(f"{item!r}: not SOURCE[#SELECTOR][:WEIGHT]")
        path, selector, weight = match["source"], match["selector"], match["weight"]
        weight = float(weight) if weight is not None else None
        if weight is not None and weight <= 0:
            raise SpecError(f"{item}: a sampling weight must be > 0")
        if path.startswith(HUB_PREFIX):  # a hub dataset: #SELECTOR is its split
            if len(path) == len(HUB_PREFIX):
                raise SpecError(f"{item}: hf: needs a dataset name, hf:ORG/NAME[#SPLIT]")
            expanded = [Source(path, split=selector or "train")]
        else:
            expanded = expand_mixture(path, selector)
        if expanded is None:
            if selector and not _SELECT.fullmatch(selector):
                raise SpecError(f"{item}: #{selector} is not a sampling strategy (all, first:N, end:N, random:N; N "
                                f"a count like 5k or a share like 50%); #NAME selects entries of a dataset_info.json "
                                f"or an InternVL meta JSON only")
            expanded = [Source(path, select=selector or "all")]
        elif weight is not None and len(expanded) > 1:
            raise SpecError(f"{item}: a weight on a mixture of {len(expanded)} sources; its entries' own repeats and "
                            f"sampling set their shares (give a weight per entry: {path}#NAME:W)")
        for source in expanded:
            source.weight = weight
        sources += expanded
    if any(s.weight is None for s in sources) and any(s.weight is not None for s in sources):
        raise SpecError(f"{spec}: give a weight to every source or to none")
    if any(s.weight is not None for s in sources) and any(s.repeat != 1 for s in sources):
        raise SpecError(f"{spec}: weights and a mixture file's repeat_time cannot be combined")
    return sources


def select_rows(n: int, select: str, seed_key: str) -> np.ndarray:
    """The rows of a file of `n` records that `select` keeps, in file order."""
    match = _SELECT.fullmatch(select)
    if not match:
        raise SpecError(f"sampling strategy {select!r}: expected all, first:N, end:N or random:N")
    if match[1] == "all":
        return np.arange(n)
    how, number, unit = match[2], float(match[3]), match[4].lower()
    count = round(n * number / 100) if unit == "%" else int(number * {"k": 1e3, "m": 1e6}.get(unit, 1))
    count = max(0, min(n, count))
    if how == "first":
        return np.arange(count)
    if how == "end":
        return np.arange(n - count, n)
    seed = int.from_bytes(seed_key.encode()[-8:].rjust(8, b"\0"), "little") % (2**32)
    return np.sort(np.random.default_rng(seed).choice(n, count, replace=False))


def expand_mixture(path: str, selector: Optional[str]) -> Optional[list[Source]]:
    """The sources a mixture file names, or None when `path` is a data file (or folder) itself."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix in (".yaml", ".yml"):
        return _llava_next_yaml(path)
    if suffix != ".json" or not os.path.isfile(path):
        return None
    try:
        check_text(path)
    except DataFileError as err:
        raise SpecError(str(err)) from None
    with open(path, encoding="utf-8-sig", errors="replace") as f:  # its records are checked where they are read
        head = f.read(1 << 16).lstrip()
    if not head.startswith("{"):
        return None  # a JSON list of records
    try:
        with open(path, encoding="utf-8-sig") as f:
            table = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        lines = isinstance(err, json.JSONDecodeError) and err.msg == "Extra data" and err.lineno > 1
        raise SpecError(f"{path}: not valid {'JSON' if isinstance(err, json.JSONDecodeError) else 'UTF-8'} ({err})"
                        + ("; it looks like JSON Lines (one record a line): name it .jsonl" if lines else "")) from err
    if not isinstance(table, dict) or not table or not all(isinstance(v, dict) for v in table.values()):
        raise SpecError(f"{path}: a JSON object that is neither a dataset_info.json nor an InternVL meta file "
                        "(expected {name: {...}, ...}); a data file holds a list of records")
    if all("annotation" in v for v in table.values()):
        return _internvl_meta(path, table, selector)
    return _dataset_info(path, table, selector)


def _entries(path: str, table: dict, selector: Optional[str], what: str) -> list[tuple[str, dict]]:
    if selector is None:
        return list(table.items())
    if selector not in table:
        raise SpecError(f"{path}: no {what} named {selector!r}; it has {', '.join(sorted(table)[:20])}")
    return [(selector, table[selector])]


def _internvl_meta(path: str, table: dict, selector: Optional[str]) -> list[Source]:
    folder, out = os.path.dirname(os.path.abspath(path)), []
    for name, entry in _entries(path, table, selector, "entry"):
        repeat = entry.get("repeat_time", 1)
        if not isinstance(repeat, (int, float)) or repeat <= 0:
            raise SpecError(f"{path}: entry {name!r}: repeat_time must be a number > 0, not {repeat!r}")
        root = entry.get("root", "")
        out.append(Source(_relative(folder, entry["annotation"]), repeat=float(repeat), name=name, origin=path,
                          image_root=_relative(folder, root) if root else "", placement="internvl"))
    return out


def _dataset_info(path: str, table: dict, selector: Optional[str]) -> list[Source]:
    if selector is None:
        raise SpecError(f"{path}: a dataset_info.json needs the entry to read: {path}#NAME (it has "
                        f"{', '.join(sorted(table)[:20])})")
    [(name, entry)] = _entries(path, table, selector, "dataset")
    folder = os.path.dirname(os.path.abspath(path))
    if entry.get("ranking"):
        raise SpecError(f"{path}#{name}: a ranking (preference) dataset; this trainer does supervised fine-tuning")
    if "file_name" not in entry and "hf_hub_url" in entry:  # read as hf:ORG/NAME, through datasets
        hub_source = True
    elif "file_name" not in entry:
        hub = next((k for k in _HUB_KEYS if k in entry), None)
        raise SpecError(f"{path}#{name}: " + (f"a {hub} dataset ({entry[hub]!r}), which this trainer cannot read; "
                                              "fetch it and name the local file" if hub else "no file_name"))
    else:
        hub_source = False
    formatting = entry.get("formatting", "alpaca")
    if formatting not in ("alpaca", "sharegpt"):
        raise SpecError(f"{path}#{name}: formatting {formatting!r} (alpaca or sharegpt are read)")
    unknown = sorted(set(entry) - {"file_name", "hf_hub_url", "formatting", "columns", "tags", "num_samples", "split",
                                   "ranking", "subset", "folder", "file_sha1"})
    if unknown:
        raise SpecError(f"{path}#{name}: keys not read: {unknown}")
    select = f"first:{int(entry['num_samples'])}" if entry.get("num_samples") else "all"
    columns = {"formatting": formatting, "columns": entry.get("columns", {}), "tags": entry.get("tags", {})}
    if hub_source:
        return [Source(f"{HUB_PREFIX}{entry['hf_hub_url']}", split=entry.get("split", "train"), select=select,
                       columns=columns, name=name, origin=path)]
    return [Source(_relative(folder, entry["file_name"]), select=select, image_root=folder, columns=columns,
                   name=name, origin=path)]


def _llava_next_yaml(path: str) -> list[Source]:
    import yaml

    try:
        with open(path, encoding="utf-8-sig") as f:
            table = yaml.safe_load(f)
    except yaml.YAMLError as err:
        raise SpecError(f"{path}: not valid YAML ({' '.join(str(err).split())})") from err
    datasets = table.get("datasets") if isinstance(table, dict) else None
    if not isinstance(datasets, list) or not datasets:
        raise SpecError(f"{path}: a mixture YAML needs `datasets: [{{json_path, sampling_strategy}}, ...]`")
    folder, out = os.path.dirname(os.path.abspath(path)), []
    for number, entry in enumerate(datasets):
        if not isinstance(entry, dict) or "json_path" not in entry:
            raise SpecError(f"{path}: datasets[{number}] has no json_path")
        select = str(entry.get("sampling_strategy", "all")).strip()
        if not _SELECT.fullmatch(select):
            raise SpecError(f"{path}: datasets[{number}]: sampling_strategy {select!r} (all, first:N, end:N, "
                            "random:N)")
        out.append(Source(_relative(folder, entry["json_path"]), select=select, name=f"datasets[{number}]",
                          origin=path))
    return out


def _relative(folder: str, path: str) -> str:
    return path if os.path.isabs(path) else os.path.join(folder, path)


# -- LLaMA-Factory's column and tag names -> the sharegpt and alpaca layouts ----------------------------------
_SHAREGPT_TAGS = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
                  "observation_tag": "observation", "function_tag": "function_call", "system_tag": "system"}
_ROLE_OF_TAG = {"user_tag": "human", "assistant_tag": "gpt", "observation_tag": "observation",
                "function_tag": "function_call", "system_tag": "system"}
_MEDIA = ("images", "videos", "audios")


@dataclass
class Remap:
    """Turns one record of a LLaMA-Factory dataset_info entry into this trainer's sharegpt or alpaca record."""

    formatting: str
    columns: dict = field(default_factory=dict)
    tags: dict = field(default_factory=dict)

    def __call__(self, record: dict) -> dict:
        if not isinstance(record, dict):
            return record
        columns = dict(self.columns)
        out, used = {}, set()

        def take(key: str, default: str):
            name = columns.get(key, default)
            if name and name in record:
                used.add(name)
                return record[name]
            return None

        for key in _MEDIA:
            value = take(key, key)
            if value is not None:
                out[key] = value
        system = take("system", "system")
        tools = take("tools", "tools")
        if tools not in (None, ""):
            out["tools"] = tools
        if self.formatting == "alpaca":
            for key, default in (("prompt", "instruction"), ("query", "input"), ("response", "output"),
                                 ("history", "history")):
                value = take(key, default)
                if value is not None:
                    out[{"prompt": "instruction", "query": "input", "response": "output"}.get(key, key)] = value
        else:
            tags = {**_SHAREGPT_TAGS, **self.tags}
            turns = take("messages", "conversations")
            if isinstance(turns, list):
                role_of = {tags[t]: role for t, role in _ROLE_OF_TAG.items() if t in tags}
                converted = []
                for turn in turns:
                    if not isinstance(turn, dict):
                        converted.append(turn)
                        continue
                    speaker = turn.get(tags["role_tag"])
                    rest = {k: v for k, v in turn.items() if k not in (tags["role_tag"], tags["content_tag"])}
                    converted.append({**rest, "from": role_of.get(speaker, speaker),
                                      "value": turn.get(tags["content_tag"])})
                turns = converted
            out["conversations"] = turns
        if system not in (None, ""):
            out["system"] = system
        out.update({k: v for k, v in record.items() if k not in used and k not in out})  # reported as ignored
        return out
