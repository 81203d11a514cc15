"""Writing a streamed compile's save folder: one weight shard per block (and one for the rest), the manifest last.

Everything goes into a hidden sibling folder that is renamed into place at the end (as `kronc.save`
does), so an interrupted or failed run leaves no folder that looks like a valid save. Under
``torch.distributed`` every rank writes the shards of its own blocks into the same folder; rank 0
gathers their manifest entries, writes config, tokenizer files and the manifest after a barrier, and
renames the folder.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ..plan import Plan
from ..serialize import FORMAT_VERSION, MANIFEST
from ..serialize.files import check_target, replace_dir, temp_name
from ..serialize.shards import shard_name, write_shard
from ..state_dicts import dedupe, unshared
from . import distributed as dist
from .skeleton import Skeleton

COPIED = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
          "merges.txt", "special_tokens_map.json", "added_tokens.json", "chat_template.jinja")
"""Files of the source folder copied beside the weights (when present)."""


@dataclass
class SaveWriter:
    """The folder being written and the shards this rank wrote."""

    out: Path
    tmp: Path
    entries: list[dict[str, Any]] = field(default_factory=list)
    dtypes: set[str] = field(default_factory=set)

    @staticmethod
    def check(out: str | Path, *, overwrite: bool = False) -> None:
        """Refuse ``out`` as `kronc.save` does: a file, or a non-empty folder that is not a kronc save."""
        check_target(Path(out), overwrite)

    @classmethod
    def prepare(cls, out: str | Path) -> SaveWriter:
        """Make the hidden folder beside ``out`` that the save is written into (rank 0 names and makes it)."""
        out = Path(out)
        name = dist.broadcast(temp_name(out) if dist.rank() == 0 else None)
        tmp = out.parent / str(name)
        if dist.rank() == 0:
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp.mkdir()
        dist.barrier()
        return cls(out, tmp)

    def write_unit(self, sk: Skeleton, unit: int | None) -> None:
        """Write block ``unit``'s state (or the rest's, for None) as its own shard."""
        if unit is None:
            state = {k: v for k, v in sk.model.state_dict().items() if sk.unit_of(k) is None}
        else:
            state = sk.blocks[unit].state_dict(prefix=sk.block_prefix(unit))
        index = sk.count if unit is None else unit
        self.write_tensors(index, sk.count + 1, unshared(dedupe(state)))

    def write_tensors(self, index: int, total: int, tensors: dict[str, Tensor]) -> None:
        """Write ``tensors`` (whole, untied, contiguous) as shard ``index`` of ``total``; keep its manifest entry."""
        entry = write_shard(self.tmp, shard_name(index, total), tensors, {"kronc_format_version": str(FORMAT_VERSION)})
        self.entries.append(entry)
        self.dtypes |= {str(t.dtype).removeprefix("torch.") for t in tensors.values() if t.is_floating_point()}

    def finish(self, model: nn.Module, plan: Plan, policy: Any, source: Path) -> Path:
        """Gather every rank's shards, write config, tokenizer and manifest (rank 0), rename into place."""
        fields = {"model_class": f"{type(model).__module__}.{type(model).__qualname__}", "huggingface": True,
                  "output": "module", "source": str(source), "example_inputs": None, "plan": plan.model_dump(mode="json"),
                  "policy": policy}
        return self.publish(fields, source, getattr(model, "config", None))

    def publish(self, fields: dict[str, Any], copy_from: Path, config: Any = None, copied: tuple[str, ...] = COPIED) -> Path:
        """Gather every rank's shard entries; rank 0 writes ``config`` (when given), the ``copied`` files of
        ``copy_from`` and the manifest (``fields`` plus the format version, versions, dtype and the shard list),
        then renames the folder into place."""
        entries = sorted((e for part in dist.gather_list(self.entries) for e in part), key=lambda e: e["file"])
        dtypes = sorted(set().union(*dist.gather_list(sorted(self.dtypes))))
        dist.barrier()  # every shard is on disk before the manifest names it
        if dist.rank() == 0:
            if config is not None and hasattr(config, "to_json_file"):
                config.to_json_file(str(self.tmp / "config.json"))
            for name in copied:
                if (copy_from / name).is_file():
                    shutil.copyfile(copy_from / name, self.tmp / name)
            manifest = {
                "format_version": FORMAT_VERSION,
                "versions": {name: _version(name) for name in ("kronc", "torch", "transformers", "safetensors")},
                **fields,
                "dtype": dtypes[0] if len(dtypes) == 1 else None,
                "weights": {"shards": entries, "bytes": sum(e["bytes"] for e in entries),
                            "tensors": sum(len(e["names"]) for e in entries)},
            }
            (self.tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
            replace_dir(self.tmp, self.out)
        dist.barrier()
        return self.out

    def abort(self) -> None:
        """Remove the unfinished folder (nothing half-written stays behind)."""
        if dist.rank() == 0:
            shutil.rmtree(self.tmp, ignore_errors=True)




def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None
