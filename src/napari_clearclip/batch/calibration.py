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

#: A length unit's count in a centimetre.
PER_CENTIMETRE = {"m": 0.01, "meter": 0.01, "metre": 0.01, "cm": 1.0, "centimeter": 1.0, "centimetre": 1.0,
                  "mm": 10.0, "millimeter": 10.0, "millimetre": 10.0, "um": 1e4, "µm": 1e4, "μm": 1e4,
                  "micron": 1e4, "microns": 1e4, "micrometer": 1e4, "micrometre": 1e4, "nm": 1e7,
                  "nanometer": 1e7, "nanometre": 1e7, "inch": 1 / 2.54, "in": 1 / 2.54}
INCH, CENTIMETER = 2, 3   # TIFF's ResolutionUnit values


@dataclass(frozen=True)
class Calibration:
    """Pixels per unit along x and y, in TIFF's ResolutionUnit ``unit`` (inch or centimetre)."""

    x: float
    y: float
    unit: int

    def tiff_options(self) -> dict:
        """``tifffile.imwrite``'s arguments that write it."""
        return {"resolution": (self.x, self.y), "resolutionunit": self.unit}


def tiff_calibration(path: Path) -> Calibration | None:
    """The pixel size ``path`` declares, or None: not a TIFF, unreadable, or no length (tags in pixels per no unit,
    as most files without a calibration have)."""
    if Path(path).suffix.lower() not in (".tif", ".tiff"):
        return None
    try:
        import tifffile

        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            tags = page.tags
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
            return found
    if None in resolution or min(resolution) <= 0:
        return None
    x, y = resolution
    if imagej_unit is not None:   # ImageJ: pixels per its unit
        per_cm = PER_CENTIMETRE.get(str(imagej_unit).strip().lower().replace("\\u00b5", "µ"))
        return None if per_cm is None else Calibration(x * per_cm, y * per_cm, CENTIMETER)
    return Calibration(x, y, unit) if unit in (INCH, CENTIMETER) and (x, y) != (1.0, 1.0) else None


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
