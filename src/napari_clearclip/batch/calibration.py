"""The pixel size of an input TIFF, carried to the TIFFs written from it, so that labels measure as the image does.

A TIFF declares its pixel size in its resolution tags (pixels per inch or per centimetre); ImageJ keeps its unit
(e.g. "um") in its own description, with the tags in pixels per that unit, and OME-TIFF in its XML. The outputs are
plain TIFFs: their tags give the pixel size per centimetre wherever the unit is a length, which every reader of
TIFF tags (ImageJ and Fiji, Bio-Formats, tifffile) understands.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..tiff_images import is_tiff_path

#: A length unit's count in a centimetre.
PER_CENTIMETRE = {"m": 0.01, "meter": 0.01, "metre": 0.01, "cm": 1.0, "centimeter": 1.0, "centimetre": 1.0,
                  "mm": 10.0, "millimeter": 10.0, "millimetre": 10.0, "um": 1e4, "µm": 1e4, "μm": 1e4,
                  "micron": 1e4, "microns": 1e4, "micrometer": 1e4, "micrometre": 1e4, "nm": 1e7,
                  "nanometer": 1e7, "nanometre": 1e7, "angstrom": 1e8, "inch": 1 / 2.54, "in": 1 / 2.54}
INCH, CENTIMETER = 2, 3   # TIFF's ResolutionUnit values


@dataclass(frozen=True)
class Calibration:
    """Pixels per unit along x and y, in TIFF's ResolutionUnit ``unit`` (inch or centimetre), of an image whose
    planes are ``plane`` (height, width; None: the outputs' own)."""

    x: float
    y: float
    unit: int
    plane: tuple[int, int] | None = None

    def tiff_options(self, shape: tuple[int, ...] | None = None) -> dict:
        """``tifffile.imwrite``'s arguments that write it for outputs of ``shape`` (their last two axes: fewer
        pixels than the image's planes, as a level of a pyramid has, are each larger)."""
        x, y = self._per_unit(shape)
        return {"resolution": (x, y), "resolutionunit": self.unit}

    def ome_zarr_attrs(self, shape: tuple[int, ...], path: str = "labels", zarr_format: int = 3) -> dict:
        """The OME-Zarr multiscales attributes that place an array of ``shape`` (y, x) at ``path`` in micrometres."""
        x, y = self._per_unit(shape)
        per_micrometre = (2.54e4 if self.unit == INCH else 1e4)
        return ome_zarr_attrs([per_micrometre / y, per_micrometre / x], [0.0, 0.0], ["micrometer"] * 2, path,
                              zarr_format)

    def _per_unit(self, shape) -> tuple[float, float]:
        if shape is None or self.plane is None:
            return self.x, self.y
        return self.x * shape[-1] / self.plane[1], self.y * shape[-2] / self.plane[0]


def ome_zarr_attrs(scale, translation, units, path: str = "labels", zarr_format: int = 3) -> dict:
    """OME-Zarr's multiscales attributes for one (y, x) array at ``path``: version 0.5 under "ome" in a zarr 3
    store, 0.4 at the top in a zarr 2 store."""
    axes = [{"name": name, "type": "space", **({"unit": unit} if unit else {})} for name, unit in zip("yx", units)]
    transforms = [{"type": "scale", "scale": [float(v) for v in scale]}]
    if any(translation):
        transforms.append({"type": "translation", "translation": [float(v) for v in translation]})
    multiscale = {"axes": axes, "datasets": [{"path": path, "coordinateTransformations": transforms}]}
    if zarr_format == 2:
        return {"multiscales": [{"version": "0.4", **multiscale}]}
    return {"ome": {"version": "0.5", "multiscales": [multiscale]}}


def input_calibration(path: Path) -> Calibration | None:
    """The pixel size a TIFF or an OME-Zarr image declares (a length unit needed), or None."""
    from ..zarr_images import RemoteStore, is_zarr_path, ome_placement

    path = path if isinstance(path, RemoteStore) else Path(path)
    if is_tiff_path(path):
        return tiff_calibration(path)

    placement = ome_placement(path) if is_zarr_path(path) else None
    if placement is None:
        return None
    per_cm = [PER_CENTIMETRE.get(str(unit).strip().lower()) if unit else None for unit in placement["units"]]
    if None in per_cm:
        return None
    (sy, sx), (cy, cx) = placement["scale"], per_cm
    return Calibration(cx / sx, cy / sy, CENTIMETER, tuple(placement["shape"]))


def tiff_calibration(path: Path) -> Calibration | None:
    """The pixel size ``path`` declares, or None: not a TIFF, unreadable, or no length (tags in pixels per no unit,
    as most files without a calibration have)."""
    if not is_tiff_path(path):
        return None
    try:
        import tifffile

        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            tags = page.tags
            plane = (int(page.imagelength), int(page.imagewidth))
            resolution = [_ratio(tags[name].value) if name in tags else None
                          for name in ("XResolution", "YResolution")]
            unit = int(tags["ResolutionUnit"].value) if "ResolutionUnit" in tags else INCH
            ome = tif.ome_metadata if tif.is_ome else None
            imagej_unit = (tif.imagej_metadata or {}).get("unit") if tif.is_imagej else None
    except Exception:
        return None
    if ome:
        found = _ome_calibration(ome)
        if found is not None:
            return Calibration(found.x, found.y, found.unit, plane)
    if None in resolution or min(resolution) <= 0:
        return None
    x, y = resolution
    if imagej_unit is not None:   # ImageJ: pixels per its unit
        per_cm = PER_CENTIMETRE.get(str(imagej_unit).strip().lower().replace("\\u00b5", "µ"))
        return None if per_cm is None else Calibration(x * per_cm, y * per_cm, CENTIMETER, plane)
    return Calibration(x, y, unit, plane) if unit in (INCH, CENTIMETER) and (x, y) != (1.0, 1.0) else None


def _ratio(value) -> float:
    if isinstance(value, tuple):
        return value[0] / value[1] if value[1] else 0.0
    return float(value)


def _ome_calibration(xml: str) -> Calibration | None:
    """From the first image's PhysicalSizeX and PhysicalSizeY (micrometres unless a unit is given)."""
    pixels = re.search(r"<(?:\w+:)?Pixels\b[^>]*>", xml)
    if pixels is None:
        return None

    def size(axis: str) -> float | None:
        value = re.search(rf'\bPhysicalSize{axis}="([^"]+)"', pixels.group(0))
        unit = re.search(rf'\bPhysicalSize{axis}Unit="([^"]+)"', pixels.group(0))
        per_cm = PER_CENTIMETRE.get(unit.group(1).strip().lower() if unit else "µm")
        try:
            length = float(value.group(1)) if value else 0.0
        except ValueError:
            return None
        return per_cm / length if per_cm and length > 0 else None

    x, y = size("X"), size("Y")
    return None if x is None or y is None else Calibration(x, y, CENTIMETER)


def labels_zarr_attrs(path: Path, shape: tuple[int, int]) -> dict:
    """The OME-Zarr attributes that place labels of ``shape`` (an image's own size) written tile by tile from the
    image at ``path`` where the image is: an OME-Zarr image's scale, translation and units as they are, a TIFF's
    pixel size in micrometres; {} where the image declares none."""
    import zarr

    from ..zarr_images import is_zarr_path, ome_placement

    zarr_format = int(zarr.config.get("default_zarr_format", 3))
    placement = ome_placement(path) if is_zarr_path(path) else None
    if placement is not None:
        factors = [full / size for full, size in zip(placement["shape"], shape)]
        return ome_zarr_attrs([s * f for s, f in zip(placement["scale"], factors)], placement["translation"],
                              placement["units"], zarr_format=zarr_format)
    calibration = input_calibration(path)
    return {} if calibration is None else calibration.ome_zarr_attrs(shape, zarr_format=zarr_format)
