"""SpatialData zarr stores written and read with an integrity check (no chunk silently read as zeros).

zarr leaves out chunks that hold only the fill value (zeros) and reads a missing chunk as zeros,
so a store that lost a chunk (an interrupted copy, a sync tool) reads back as valid data with
a block of zeros. :func:`write_zarr` writes every chunk and a manifest
(``bitro_sc_manifest.json``: size and CRC-32 of every file); :func:`read_zarr` checks the store
against it before reading and names the damaged element. A store written by ``sdata.write``
(no manifest) is checked for missing chunks, which are reported with a warning (they may be
all-zero chunks zarr skipped, or lost ones).
"""

from __future__ import annotations

import json
import os
import warnings
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from spatialdata import SpatialData

#: name of the manifest file at the root of a store written by :func:`write_zarr`
MANIFEST = "bitro_sc_manifest.json"
_CHUNK = 1 << 20


def _crc(path: Path) -> int:
    crc = 0
    with open(path, "rb") as fh:
        while block := fh.read(_CHUNK):
            crc = zlib.crc32(block, crc)
    return crc


def _files(root: Path) -> dict[str, Path]:
    out = {}
    for d, _, names in os.walk(root):
        for n in names:
            p = Path(d) / n
            rel = p.relative_to(root).as_posix()
            if rel != MANIFEST:
                out[rel] = p
    return out


def write_zarr(sdata: SpatialData, path: str | Path, *, overwrite: bool = False) -> Path:
    """Write ``sdata`` to a zarr store with every chunk and a manifest that :func:`read_zarr` checks.

    Parameters
    ----------
    sdata
        The SpatialData object.
    path
        Store path (``.zarr`` directory).
    overwrite
        Replace an existing store at ``path``.

    Returns
    -------
    The store path.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> import bitro_sc as bs
    >>> sdata = bs.datasets.toy("image", n=3)
    >>> path = bs.io.write_zarr(sdata, pathlib.Path(tempfile.mkdtemp()) / "slide.zarr")
    >>> list(bs.io.read_zarr(path).images)
    ['he']
    """
    import zarr

    path = Path(path).expanduser()
    if path.exists() and not overwrite:
        raise FileExistsError(f"{str(path)!r} exists; pass `overwrite=True` or another path.")
    with zarr.config.set({"array.write_empty_chunks": True}):
        sdata.write(path, overwrite=overwrite)
    files = {rel: [p.stat().st_size, _crc(p)] for rel, p in sorted(_files(path).items())}
    tmp = path / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps({"format": 1, "files": files}))
    tmp.replace(path / MANIFEST)
    return path


def check_zarr(path: str | Path, *, checksums: bool = True) -> None:
    """Raise when the store at ``path`` differs from its manifest; warn about missing chunks without one."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"The zarr store {str(root)!r} does not exist. Check the path.")
    manifest = root / MANIFEST
    if not manifest.is_file():
        _warn_missing_chunks(root)
        return
    try:
        expected = json.loads(manifest.read_text())["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(
            f"The manifest {str(manifest)!r} of the store is damaged ({err}); the store cannot be verified. "
            "Copy the store again from its source."
        ) from err
    missing, changed = [], []
    for rel, (size, crc) in expected.items():
        p = root / rel
        if not p.is_file():
            missing.append(rel)
        elif p.stat().st_size != size or (checksums and _crc(p) != crc):
            changed.append(rel)
    if missing or changed:
        bad = missing or changed
        elements = sorted({"/".join(r.split("/")[:2]) for r in bad})
        what = (
            f"{len(missing)} file(s) missing" if missing else f"{len(changed)} file(s) changed or cut short"
        )
        raise ValueError(
            f"The zarr store {str(root)!r} is damaged: {what} (e.g. {bad[:3]}), in {elements[:5]}. "
            "Reading it would give wrong values (zarr reads a lost chunk as zeros). Copy the store again "
            "from its source, or write it again with `bs.io.write_zarr`."
        )


def _warn_missing_chunks(root: Path) -> None:
    import zarr

    short = []

    def visit(group: Any, prefix: str) -> None:
        for name, member in group.members():
            key = f"{prefix}{name}"
            if isinstance(member, zarr.Array):
                if member.size and member.nchunks_initialized < member.nchunks:
                    short.append(f"{key} ({member.nchunks - member.nchunks_initialized} of {member.nchunks})")
            else:
                visit(member, key + "/")

    try:
        visit(zarr.open_group(root, mode="r"), "")
    except (ValueError, KeyError, OSError, zarr.errors.BaseZarrError) as err:
        raise ValueError(
            f"The zarr store {str(root)!r} cannot be opened ({type(err).__name__}: {err}); it is damaged or "
            "not a zarr store. Copy it again from its source."
        ) from err
    if short:
        warnings.warn(
            f"The zarr store {str(root)!r} has no manifest and lacks chunks of {len(short)} array(s) "
            f"{short[:20]}{' ...' if len(short) > 20 else ''}: zarr skips all-zero chunks, but a lost chunk "
            "also reads as zeros. Write stores "
            "with `bs.io.write_zarr` so that `bs.io.read_zarr` can tell the two apart.",
            UserWarning,
            stacklevel=3,
        )


def read_zarr(path: str | Path, *, checksums: bool = True) -> SpatialData:
    """Read a SpatialData zarr store after checking it is whole (see :func:`write_zarr`).

    Parameters
    ----------
    path
        Store path.
    checksums
        Compare the CRC-32 of every file with the manifest (else sizes only; faster on whole slides).

    Raises
    ------
    FileNotFoundError
        No store at ``path``.
    ValueError
        A file listed in the manifest is missing, cut short or changed (the message names the
        elements), or the store cannot be opened.
    """
    import spatialdata as sd

    check_zarr(path, checksums=checksums)
    return sd.read_zarr(Path(path).expanduser())
