"""Streamed checkpoint reading and writing for conversion: one tensor in memory at a time, safetensors only, and an
output folder that appears only once complete."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"


class CheckpointReader:
    """Tensors of a Transformers checkpoint folder (single file or sharded with an index), read lazily."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"Checkpoint folder not found: {self.folder}")
        index = self.folder / SAFE_INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (self.folder / SAFE_SINGLE).is_file():
            with safe_open(self.folder / SAFE_SINGLE, framework="pt") as handle:
                weight_map = dict.fromkeys(handle.keys(), SAFE_SINGLE)
        else:
            others = sorted(p.name for p in self.folder.glob("*.bin")) + sorted(
                p.name for p in self.folder.glob("*.pt")
            )
            hint = f" (found {others}: only safetensors are read)" if others else ""
            raise FileNotFoundError(f"No {SAFE_SINGLE} or {SAFE_INDEX} in {self.folder}{hint}")
        missing = sorted({f for f in weight_map.values() if not (self.folder / f).is_file()})
        if missing:
            raise FileNotFoundError(f"Shard file(s) listed in {SAFE_INDEX} are missing from {self.folder}: {missing}")
        self.weight_map: dict[str, str] = weight_map
        self._handles: dict[str, object] = {}

    def _handle(self, file: str):
        if file not in self._handles:
            try:
                self._handles[file] = safe_open(self.folder / file, framework="pt", device="cpu")
            except Exception as error:  # safetensors raises its own error types for corrupt headers
                raise ValueError(f"Cannot read shard {self.folder / file}: {error}") from error
        return self._handles[file]

    def release(self, file: str) -> None:
        """Unmap a shard once its tensors are read, so its pages do not stay resident."""
        self._handles.pop(file, None)

    def names(self) -> list[str]:
        return list(self.weight_map)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(self.weight_map[name]).get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        try:
            return self._handle(self.weight_map[name]).get_tensor(name)
        except Exception as error:
            raise ValueError(f"Cannot read tensor {name!r} from {self.weight_map[name]}: {error}") from error

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def parse_size(size: str | int) -> int:
    """`"5GB"`, `"500MB"`, `"200KB"` or a byte count -> bytes (decimal units, as Transformers' `max_shard_size`)."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?i?B)?\s*", size, flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"Cannot parse size {size!r}; use e.g. '5GB', '500MB' or a byte count")
    units = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    return int(float(match.group(1)) * units[(match.group(2) or "B").upper()])


class ShardedWriter:
    """Writes tensors in order into safetensors shards of at most `max_shard_bytes`, then the index.

    Only the current shard is held in memory; shard names get their final `-of-N` count in `close()`.
    """

    def __init__(self, folder: Path, max_shard_bytes: int, dtype: torch.dtype | None = None):
        self.folder = folder
        self.max_shard_bytes = max_shard_bytes
        self.dtype = dtype
        self._current: dict[str, torch.Tensor] = {}
        self._current_bytes = 0
        self._shards: list[list[str]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if self.dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(self.dtype)
        tensor = tensor.contiguous()
        size = tensor.numel() * tensor.element_size()
        if self._current and self._current_bytes + size > self.max_shard_bytes:
            self._flush()
        self._current[name] = tensor
        self._current_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        save_file(self._current, self.folder / f"shard-{len(self._shards):05d}.partial", metadata={"format": "pt"})
        self._shards.append(list(self._current))
        self._current, self._current_bytes = {}, 0

    def close(self) -> int:
        """Flush, name the shards and write the index (or a single `model.safetensors`). Returns the shard count."""
        if self._current:
            self._flush()
        count = len(self._shards)
        if count == 1:
            os.replace(self.folder / "shard-00000.partial", self.folder / SAFE_SINGLE)
            return 1
        weight_map = {}
        for number, names in enumerate(self._shards):
            final = f"model-{number + 1:05d}-of-{count:05d}.safetensors"
            os.replace(self.folder / f"shard-{number:05d}.partial", self.folder / final)
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.folder / SAFE_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        return count


@contextlib.contextmanager
def staged_output(output: str | os.PathLike, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary folder beside `output`; it becomes `output` only if the block completes.

    On any error the temporary folder is removed and an existing `output` is left untouched.
    """
    output = Path(output)
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output} already exists; pass overwrite=True (--overwrite) to replace it")
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if output.exists():
        backup = Path(tempfile.mkdtemp(prefix=f".{output.name}.old-", dir=output.parent))
        os.replace(output, backup / "old")
        os.replace(staging, output)
        shutil.rmtree(backup, ignore_errors=True)
    else:
        os.replace(staging, output)


__all__ = ["CheckpointReader", "ShardedWriter", "parse_size", "staged_output"]
