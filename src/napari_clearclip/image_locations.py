"""Where an image is read from: a local file or folder, or an address on a network (a remote zarr store, as
napari-ome-zarr opens one from ``https://`` or ``s3://``), written one way only, so that the results of an image
are found again whichever folder napari was started from."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

#: "scheme://", with fsspec's chained forms ("simplecache::s3://...") too; a Windows drive ("C:\\") is no scheme
_ADDRESS = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]+(::[A-Za-z][A-Za-z0-9+.\-]+)*://")


def remote_address(location) -> str | None:
    """The address of an image read over a network, without a trailing slash; None for a local path (a
    ``file://`` address included) and for anything held in one process only (``memory://``)."""
    if not isinstance(location, str) or not _ADDRESS.match(location):
        return None
    scheme = location.split("://", 1)[0].split("::")[-1].lower()
    if scheme in ("file", "local", "memory"):
        return None
    return location.rstrip("/") or None


@dataclass(frozen=True)
class RemoteStore:
    """A zarr store read over a network, as an input of a batch (``https://host/data/slide.zarr``, ``s3://...``):
    named by its address, where a local input is a Path (which would fold the address's ``//`` into a local name).
    ``name`` and ``stem`` name its outputs as a file's name and stem do."""

    address: str

    def __post_init__(self):
        if remote_address(self.address) is None:
            raise ValueError(f"{self.address!r} is not the address of a store on a network")
        object.__setattr__(self, "address", remote_address(self.address))

    @property
    def name(self) -> str:
        return location_name(self.address)

    @property
    def stem(self) -> str:
        return Path(self.name).stem

    def __str__(self) -> str:
        return self.address


def image_location(location: str | os.PathLike) -> str:
    """``location`` written as a result's record keeps it: a network address as it is (:func:`remote_address`),
    a local path absolute with its links resolved (``file://`` addresses made paths)."""
    address = remote_address(location)
    if address is not None:
        return address
    if isinstance(location, str) and location.lower().startswith("file://"):
        location = unquote(urlparse(location).path)
    return str(Path(location).expanduser().resolve())


def location_name(location: str | os.PathLike) -> str:
    """The last part of ``location``'s name ("slide.zarr" of ``https://host/data/slide.zarr/``), to name what is
    saved from its image."""
    address = remote_address(location)
    if address is not None:
        return address.split("?", 1)[0].split("#", 1)[0].rstrip("/").rsplit("/", 1)[-1] or "image"
    return Path(location).name or "image"


def is_local_file(location) -> bool:
    """Whether ``location`` names a local file or folder that exists (a network address does not)."""
    if location is None or remote_address(location) is not None:
        return False
    try:
        return Path(image_location(location)).exists()
    except (OSError, ValueError):
        return False
