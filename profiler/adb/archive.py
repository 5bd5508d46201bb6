"""A batch of models as the phone receives it: safe remote names, bounded batches, one archive.

The archive is a POSIX ustar archive (`tarfile.USTAR_FORMAT`) of plain files, mode 0644,
owner 0 without names, mtime 0: what `android_bench/run_batch.sh` accepts (it checks the
listing of toybox's or GNU's `tar -tvf` before unpacking) and the same bytes for the same
models.  One file per batch instead of one per model saves the phone's answer to every
file, a round trip per model.
"""
from __future__ import annotations

import io
import re
import tarfile
from collections.abc import Iterable, Iterator, Sequence

__all__ = ["batch_archive", "remote_name", "split_batches"]

_SAFE_NAME_RE = re.compile(r"[^A-Za-z0-9._-]+")
_REMOTE_PART_RE = re.compile(r"^[A-Za-z0-9._-]+$")
_USTAR_NAME_BYTES = 100  # a member name without a directory part (ustar's prefix field splits at "/")
_FILE_MODE = 0o644


def remote_name(index: int, model_id: str) -> str:
    """A file name that is safe unquoted and unique in its batch, e.g. `m007_conv2d_f32_8x8x16_32.tflite`."""
    hint = _SAFE_NAME_RE.sub("_", model_id).strip("._-")[:60] or "model"
    name = f"m{index:03d}_{hint}.tflite"
    assert _REMOTE_PART_RE.match(name)
    return name


def split_batches(models: Iterable[tuple[str, bytes]], size: int, max_bytes: int) -> Iterator[list[tuple[str, bytes]]]:
    """`models` in batches of `size`, a batch ending early before its models pass
    `max_bytes` (a model larger than that goes alone): what the phone and this computer
    hold of one batch stays bounded whatever the layers' sizes."""
    batch: list[tuple[str, bytes]] = []
    held = 0
    for model in models:
        if batch and (len(batch) == size or held + len(model[1]) > max_bytes):
            yield batch
            batch, held = [], 0
        batch.append(model)
        held += len(model[1])
    if batch:
        yield batch


def batch_archive(entries: Sequence[tuple[str, bytes, str]]) -> bytes:
    """The models of `entries` ((model_id, tflite, remote name)) as one ustar archive, in order."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        for _, data, name in entries:
            size = len(name.encode())
            if size > _USTAR_NAME_BYTES:
                raise ValueError(
                    f"A ustar member name has at most {_USTAR_NAME_BYTES} bytes. Received: name={name!r} ({size} bytes)."
                )
            member = tarfile.TarInfo(name)
            member.size, member.mode, member.mtime = len(data), _FILE_MODE, 0
            member.uid = member.gid = 0
            member.uname = member.gname = ""
            archive.addfile(member, io.BytesIO(data))
    return buffer.getvalue()
