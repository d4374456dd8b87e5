"""Lessons: what strokes taught, kept in a file and used on other images, other sessions and whole folders.

A lesson holds the classes, the exemplars (the patch embeddings under strokes, with their
class) and the model and window settings they were made with: exemplars only compare with
patches that the same model encoded the same way, so a lesson from another model, method or
window setting is refused with a message that says which.

File format (``.npz``, read without pickle, so a lesson from a stranger cannot run code):

- ``features``: float32 (N, E), the exemplar embeddings;
- ``classes``: int32 (N,), each exemplar's 0-based class index;
- ``meta``: uint8, UTF-8 JSON with ``format`` ("napari-clearclip lesson"), ``version`` (1),
  ``classes`` (each class as a list: its name, then its synonyms), ``model``, ``weights``,
  ``method``, ``short_side``, ``crop``, ``stride``, ``made_with`` (the package version) and
  ``images`` (how many images the strokes were on; 0 when ``covariance`` is absent);
- ``covariance`` (optional): float32 (E, E), the patch covariance of those images, averaged
  over them. Exemplars are compared with a new image's patches after whitening with it
  (regularised at its sixth-largest eigenvalue: ``strokes.OTHER_IMAGES_WHITENING_RANK``); a
  lesson without it (made by an earlier version) is whitened with each new image's own.
- ``class_offsets`` (optional): float32 (C,), per class (in ``classes`` order) what the lesson adds to the class's
  scores in runs with edge snapping (and in all runs where ``unsnapped_offsets`` are absent), in units of the
  scored image's text-score spread, at the patches where one of the two classes the text scores highest has an
  offset (``strokes.offsets_between_taught_classes``; never so that a whole region of patches loses the class the
  text gives it: ``strokes.Exemplars.teach``); 0 for a class the lesson has no exemplar of; fitted on the painted
  patches when the exemplars come from two or more images (see ``strokes.lesson_offsets``), and fitted anew when
  lessons are combined;
- ``image_ids`` (optional, with the next two): int32 (N,), which painted image each exemplar came from;
- ``image_means``: float32 (images, E), those images' patch means;
- ``text``: float32 (Q, E), the text embeddings of the classes' names and synonyms (in order) the
  lesson was made with; with ``logit_scale`` in ``meta``, what fitting the offsets needs.
- ``references`` (optional, with the next two; needs ``image_means``): float32 (R, E), a sample of patches of
  the painted images (up to ``strokes.REFERENCES_PER_CLASS`` per class and image), with which the exemplars
  are checked when lessons are made or combined (``strokes.uncontradicted``);
- ``reference_classes``: int32 (R,), each one's class on its image; ``reference_ids``: int32 (R,), its image.
- ``pixel_context``, ``pixel_context_ids``, ``pixel_taps``, ``pixel_tap_weights``, ``pixel_classes``, ``pixel_ids``
  (optional, together; need ``image_means``): painted pixels at the working size (up to
  ``pixel_samples.SAMPLES_PER_CLASS`` per class and image), as a run without edge snapping scores them:
  ``pixel_context`` float32 (K, E) window patches of the painted images (``pixel_context_ids`` int32 (K,): which
  one), ``pixel_taps`` int32 (T, 2) pairs of (pixel, patch) with ``pixel_tap_weights`` float32 (T,), the
  bilinear weights averaged over the windows, summing to one per pixel; ``pixel_classes`` int32 (S,) each pixel's
  painted class, ``pixel_ids`` int32 (S,) its image;
- ``unsnapped_offsets`` (optional, with the pixels): float32 (C,), the class offsets that runs without edge
  snapping use instead of ``class_offsets``, fitted on those pixels (``strokes.lesson_offsets``); where they are
  absent, ``class_offsets`` serve both kinds of run.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .errors import InvalidOptionError, LessonError, LessonExistsError, LessonNotFoundError
from .pixel_samples import PixelSamples

FORMAT = "napari-clearclip lesson"
VERSION = 1
SUFFIX = ".npz"
#: Largest class offset a lesson may hold, in text-score spreads. Fitted offsets stay within a few spreads
#: (their squared length is penalised); a hundred would override any text, so a file holding more is damaged.
MAX_CLASS_OFFSET = 100.0
#: The file's arrays of a lesson's painted pixels: file name -> (PixelSamples field, type in the file).
PIXEL_ARRAYS = {"pixel_context": ("context", np.float32), "pixel_context_ids": ("context_ids", np.int32),
                "pixel_taps": ("taps", np.int32), "pixel_tap_weights": ("weights", np.float32),
                "pixel_classes": ("classes", np.int32), "pixel_ids": ("image_ids", np.int32)}


@dataclass(frozen=True)
class Lesson:
    """Exemplars taught by strokes, with the classes and the model identity they belong to."""

    classes: tuple[tuple[str, ...], ...]   # each class: its name first, then its synonyms
    features: np.ndarray                   # (N, E) float32
    labels: np.ndarray                     # (N,) 0-based class of each exemplar
    model: str
    weights: str
    method: str
    windows: tuple                          # (short_side, crop, stride) as resolved for the model
    covariance: np.ndarray | None = None    # (E, E) patch covariance of the painted images, averaged
    images: int = 0                         # how many images that is
    class_offsets: np.ndarray | None = None  # (C,) float32, added to each class's scores, in text-score spreads
    image_ids: np.ndarray | None = None      # (N,) the painted image each exemplar came from
    image_means: np.ndarray | None = None    # (images, E) float32 patch means of those images
    text: np.ndarray | None = None           # (Q, E) float32 the text embeddings of the classes' queries
    logit_scale: float = 50.0                # of the method the offsets were fitted for
    references: np.ndarray | None = None     # (R, E) float32 patches of the painted images, to check exemplars with
    reference_classes: np.ndarray | None = None  # (R,) each one's class there (as the image's labels say)
    reference_ids: np.ndarray | None = None  # (R,) which painted image (as image_ids) each one is from
    # what the references are made from, until they are (see :meth:`completed`): per painted image, the image, its
    # labels read every ``step`` pixels, ``step``, the classes and the options; not saved
    sources: tuple | None = field(default=None, compare=False, repr=False)
    # the painted pixels as runs without edge snapping score them (see pixel_samples), and the offsets fitted on them
    pixels: "PixelSamples | None" = field(default=None, compare=False, repr=False)
    unsnapped_offsets: np.ndarray | None = None  # (C,) float32, for runs without edge snapping, in spreads

    @property
    def class_names(self) -> list[str]:
        return [synonyms[0] for synonyms in self.classes]

    def __len__(self) -> int:
        return len(self.labels)

    def __repr__(self) -> str:
        counts = np.bincount(self.labels, minlength=len(self.classes))
        taught = ", ".join(f"{name}: {int(n)}" for name, n in zip(self.class_names, counts))
        return f"Lesson({len(self)} exemplars; {taught}; model={self.model!r}, method={self.method!r})"

    # -- files ----------------------------------------------------------------------------------------

    @staticmethod
    def file_for(path: str | os.PathLike) -> Path:
        """The file :meth:`save` writes for ``path``: ``.npz`` added if missing."""
        path = Path(path)
        return path if path.suffix == SUFFIX else path.with_name(path.name + SUFFIX)

    def save(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write the lesson to ``path`` (``.npz`` added if missing), atomically; never replaces a file unasked."""
        from . import __version__
        from .files import write_atomic

        path = self.file_for(path)
        if path.exists() and not overwrite:
            raise LessonExistsError(f"{path} exists: choose another name, or pass overwrite=True to replace it.")
        meta = {"format": FORMAT, "version": VERSION, "classes": [list(c) for c in self.classes],
                "model": self.model, "weights": self.weights, "method": self.method,
                "short_side": self.windows[0], "crop": self.windows[1], "stride": self.windows[2],
                "made_with": __version__, "images": self.images if self.covariance is not None else 0,
                "logit_scale": self.logit_scale}
        arrays = {"features": self.features.astype(np.float32), "classes": self.labels.astype(np.int32),
                  "meta": np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)}
        if self.covariance is not None:
            arrays["covariance"] = self.covariance.astype(np.float32)
        if self.class_offsets is not None:
            arrays["class_offsets"] = self.class_offsets.astype(np.float32)
        if self._can_fit():
            arrays.update(image_ids=self.image_ids.astype(np.int32), image_means=self.image_means.astype(np.float32),
                          text=self.text.astype(np.float32))
            if self.references is not None:
                arrays.update(references=self.references.astype(np.float32),
                              reference_classes=self.reference_classes.astype(np.int32),
                              reference_ids=self.reference_ids.astype(np.int32))
            if self.pixels is not None:
                arrays.update({name: getattr(self.pixels, field_name).numpy().astype(kind)
                               for name, (field_name, kind) in PIXEL_ARRAYS.items()})
                if self.unsnapped_offsets is not None:
                    arrays["unsnapped_offsets"] = self.unsnapped_offsets.astype(np.float32)
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)

        def write(target: Path) -> None:
            target.write_bytes(buffer.getvalue())

        write_atomic(path, write)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Lesson":
        """Read a lesson written by :meth:`save`; anything else is a clear :class:`LessonError`."""
        path = Path(path)
        saved_as = path.with_name(path.name + SUFFIX)
        try:
            if not path.exists() and path.suffix != SUFFIX and saved_as.is_file():
                path = saved_as  # the name given to save, which added the suffix
            found, there = path.is_file(), path.exists()
        except OSError as exc:  # a name longer than the file system takes, say
            raise LessonNotFoundError(f"No lesson file at {path}: {exc.strerror or exc}.") from None
        if not found:
            raise LessonNotFoundError(f"No lesson file at {path}." if not there else
                                      f"{path} is a folder, not a lesson file.")
        try:
            with np.load(path, allow_pickle=False) as archive:
                names = set(archive.files)
                if not {"features", "classes", "meta"} <= names:
                    raise LessonError(f"{path} is not a napari-clearclip lesson (it holds {sorted(names)}).")
                meta = json.loads(archive["meta"].tobytes().decode())
                features, labels = archive["features"], archive["classes"]
                covariance = archive["covariance"] if "covariance" in names else None
                offsets = archive["class_offsets"] if "class_offsets" in names else None
                fitting = tuple(archive[n] for n in ("image_ids", "image_means", "text")) \
                    if {"image_ids", "image_means", "text"} <= names else None
                checking = tuple(archive[n] for n in ("references", "reference_classes", "reference_ids")) \
                    if {"references", "reference_classes", "reference_ids"} <= names else None
                pixels = {n: archive[n] for n in PIXEL_ARRAYS} if set(PIXEL_ARRAYS) <= names else None
                unsnapped = archive["unsnapped_offsets"] if "unsnapped_offsets" in names else None
        except LessonError:
            raise
        except (OSError, ValueError, zipfile.BadZipFile, EOFError, UnicodeDecodeError, KeyError) as exc:
            raise LessonError(f"{path} is not a napari-clearclip lesson, or it is damaged ({exc}).") from None
        lesson = cls._from_parts(path, meta, features, labels, covariance, offsets, fitting, checking)
        return lesson._with_pixels(path, pixels, unsnapped)

    def _with_pixels(self, path, arrays: dict | None, unsnapped) -> "Lesson":
        """This lesson with the painted pixels and their offsets read from a file, checked; unchanged without them."""
        if arrays is None or self.image_means is None:
            return self
        try:
            pixels = PixelSamples(**{field_name: torch.from_numpy(np.ascontiguousarray(arrays[name]).astype(
                np.float32 if kind == np.float32 else np.int64)) for name, (field_name, kind) in PIXEL_ARRAYS.items()})
        except (TypeError, ValueError):
            pixels = None
        if pixels is None or not pixels.is_consistent(len(self.classes), len(self.image_means),
                                                      self.features.shape[1]):
            raise LessonError(f"{path} is a damaged lesson: its painted pixels do not fit its exemplars.")
        if unsnapped is not None:
            if (unsnapped.shape != (len(self.classes),) or unsnapped.dtype.kind != "f"
                    or not np.isfinite(unsnapped).all() or np.abs(unsnapped).max() > MAX_CLASS_OFFSET):
                raise LessonError(f"{path} is a damaged lesson: its class offsets without edge snapping do not fit "
                                  f"its {len(self.classes)} classes.")
            unsnapped = unsnapped.astype(np.float32)
        return replace(self, pixels=pixels, unsnapped_offsets=unsnapped)

    @classmethod
    def _from_parts(cls, path, meta, features, labels, covariance=None, offsets=None, fitting=None,
                    checking=None) -> "Lesson":
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise LessonError(f"{path} is not a napari-clearclip lesson.")
        version = meta.get("version")
        if not isinstance(version, int) or version > VERSION:
            raise LessonError(f"{path} was made by a newer napari-clearclip ({meta.get('made_with', '?')}, "
                              f"lesson format {version}): update napari-clearclip to use it.")
        try:
            classes = tuple(tuple(str(s) for s in c) for c in meta["classes"])
            identity = (str(meta["model"]), str(meta["weights"]), str(meta["method"]))
            windows = (meta["short_side"], meta["crop"], meta["stride"])
        except (KeyError, TypeError) as exc:
            raise LessonError(f"{path} is a damaged lesson (missing {exc}).") from None
        if not classes or any(not c for c in classes):
            raise LessonError(f"{path} is a damaged lesson: it names no classes.")
        if features.ndim != 2 or labels.ndim != 1 or len(features) != len(labels) or features.dtype.kind != "f":
            raise LessonError(f"{path} is a damaged lesson: its exemplars and their classes do not match.")
        if len(labels) == 0:
            raise LessonError(f"{path} is an empty lesson: it holds no exemplars.")
        if labels.dtype.kind not in "iu" or labels.min() < 0 or labels.max() >= len(classes):
            raise LessonError(f"{path} is a damaged lesson: an exemplar belongs to no class of the "
                              f"{len(classes)} it names.")
        if not np.isfinite(features).all():
            raise LessonError(f"{path} is a damaged lesson: its exemplars hold NaN or infinite values.")
        images = meta.get("images", 0)
        if covariance is not None:
            width = features.shape[1]
            if (covariance.shape != (width, width) or covariance.dtype.kind != "f" or not np.isfinite(covariance).all()
                    or not isinstance(images, int) or images < 1 or not _is_covariance(covariance)):
                raise LessonError(f"{path} is a damaged lesson: its patch covariance does not fit its exemplars.")
            covariance = covariance.astype(np.float32)
        if offsets is not None:
            if (offsets.shape != (len(classes),) or offsets.dtype.kind != "f" or not np.isfinite(offsets).all()
                    or np.abs(offsets).max() > MAX_CLASS_OFFSET):
                raise LessonError(f"{path} is a damaged lesson: its class offsets do not fit its {len(classes)} "
                                  "classes.")
            offsets = offsets.astype(np.float32)
        image_ids = image_means = text = None
        logit_scale = meta.get("logit_scale", 50.0)
        if fitting is not None and covariance is not None:
            image_ids, image_means, text = fitting
            queries = sum(len(c) for c in classes)
            if (image_ids.shape != labels.shape or image_ids.dtype.kind not in "iu" or image_means.ndim != 2
                    or image_means.shape[1] != features.shape[1] or text.shape != (queries, features.shape[1])
                    or (len(image_ids) and (image_ids.min() < 0 or image_ids.max() >= len(image_means)))
                    or not np.isfinite(image_means).all() or not np.isfinite(text).all()
                    or not isinstance(logit_scale, (int, float)) or not logit_scale > 0):
                raise LessonError(f"{path} is a damaged lesson: the record of its painted images does not fit its "
                                  "exemplars.")
            image_ids, image_means, text = (image_ids.astype(np.int64), image_means.astype(np.float32),
                                            text.astype(np.float32))
        references = reference_classes = reference_ids = None
        if checking is not None and image_means is not None:
            references, reference_classes, reference_ids = checking
            if (references.ndim != 2 or references.shape[1] != features.shape[1] or references.dtype.kind != "f"
                    or reference_classes.shape != (len(references),) or reference_ids.shape != (len(references),)
                    or reference_classes.dtype.kind not in "iu" or reference_ids.dtype.kind not in "iu"
                    or not np.isfinite(references).all()
                    or (len(references) and (reference_classes.min() < 0 or reference_classes.max() >= len(classes)
                                             or reference_ids.min() < 0 or reference_ids.max() >= len(image_means)))):
                raise LessonError(f"{path} is a damaged lesson: the patches it checks its exemplars with do not fit "
                                  "its exemplars.")
            references, reference_classes, reference_ids = (references.astype(np.float32),
                                                            reference_classes.astype(np.int64),
                                                            reference_ids.astype(np.int64))
        return cls(classes, features.astype(np.float32), labels.astype(np.int64), *identity, windows, covariance,
                   images if covariance is not None else 0, offsets, image_ids, image_means, text,
                   float(logit_scale) if isinstance(logit_scale, (int, float)) else 50.0, references,
                   reference_classes, reference_ids)

    def fingerprint(self) -> str:
        """A digest of the lesson's content (for a batch run's record of what made its outputs)."""
        import hashlib

        digest = hashlib.sha256(json.dumps([self.classes, self.model, self.weights, self.method,
                                            list(self.windows)]).encode())
        digest.update(np.ascontiguousarray(self.features, dtype=np.float32).data)
        digest.update(np.ascontiguousarray(self.labels, dtype=np.int64).data)
        if self.covariance is not None:
            digest.update(np.ascontiguousarray(self.covariance, dtype=np.float32).data)
        if self.class_offsets is not None:
            digest.update(b"offsets" + np.ascontiguousarray(self.class_offsets, dtype=np.float32).tobytes())
        if self.unsnapped_offsets is not None:
            digest.update(b"unsnapped" + np.ascontiguousarray(self.unsnapped_offsets, dtype=np.float32).tobytes())
        if self.pixels is not None:
            for field_name, kind in PIXEL_ARRAYS.values():
                digest.update(np.ascontiguousarray(getattr(self.pixels, field_name).numpy(), dtype=kind).tobytes())
        return digest.hexdigest()[:20]

    # -- making and using ------------------------------------------------------------------------------

    @classmethod
    def from_exemplars(cls, exemplars, classes, segmenter, options, method: str | None = None,
                       fit: bool = True) -> "Lesson":
        """The lesson of ``exemplars`` (from :meth:`Segmenter.collect_exemplars`) made on ``segmenter`` (with
        ``method``, else the segmenter's); with ``fit=False`` not :meth:`fitted` yet."""
        from .prompts import parse_classes

        parsed = parse_classes(classes)
        if exemplars is None or len(exemplars.features) == 0:
            raise LessonError("There is nothing to learn: no stroke covers a patch of any image.")
        features, labels, source = exemplars.features, exemplars.classes, exemplars
        if exemplars.others is not None:  # strokes on the scored image and on others: the others' covariance
            source = exemplars.others
            features = torch.cat([features.cpu(), source.features.cpu()])
            labels = torch.cat([labels.cpu(), source.classes.cpu()])
        covariance = None if source.covariance is None else source.covariance.double().cpu().numpy()
        image_ids = image_means = text = pixels = None
        if covariance is not None and source.image_ids is not None and source.image_means is not None:
            image_ids = source.image_ids.cpu().numpy().astype(np.int64)
            if source is not exemplars:  # the strokes on the scored image come first, from no recorded image
                image_ids = None
            else:
                image_means = source.image_means.float().cpu().numpy()
                text = segmenter.encode_classes(classes, options.templates).float().cpu().numpy()
                pixels = source.pixels
        lesson = cls(tuple(tuple(c.synonyms) for c in parsed), features.float().cpu().numpy(),
                     labels.cpu().numpy().astype(np.int64), segmenter.model.name,
                     segmenter.model.weights_id, method or segmenter.method,
                     (options.short_side, options.crop, options.stride),
                     None if covariance is None else covariance.astype(np.float32),
                     source.images if covariance is not None else 0, None, image_ids, image_means, text,
                     float(options.logit_scale), pixels=pixels)
        return lesson.fitted() if fit else lesson

    def completed(self, segmenter) -> "Lesson":
        """This lesson with the references its ``sources`` make (:meth:`with_references`), computed now: the widget
        records what they are made from after a run and makes them only when the lesson is used or saved."""
        if self.sources is None or self.references is not None:
            return self
        found = []
        for image, sampled, step, shape, classes, options in self.sources:
            labels = np.zeros(shape, np.int32)
            labels[::step, ::step] = sampled
            found.append(segmenter.lesson_references(image, labels, classes, options))
        return replace(self.with_references(found), sources=None)

    def with_references(self, found: Sequence) -> "Lesson":
        """This lesson with patches of its painted images to check exemplars with (see :meth:`checked`): ``found``
        holds, per painted image in the order of its exemplars' images, the patches with their classes there
        (:meth:`Segmenter.lesson_references`, from the image's labels). Unchanged where they do not match."""
        if (not self._can_fit() or not found or any(f is None for f in found)
                or len(found) != len(self.image_means)):
            return self
        return replace(self, references=torch.cat([f.features.float().cpu() for f in found]).numpy(),
                       reference_classes=torch.cat([f.classes.cpu() for f in found]).numpy().astype(np.int64),
                       reference_ids=np.concatenate([np.full(len(f.classes), i, np.int64)
                                                     for i, f in enumerate(found)]))

    def _can_fit(self) -> bool:
        return (self.covariance is not None and self.image_ids is not None and self.image_means is not None
                and self.text is not None)

    def checked(self) -> "Lesson":
        """This lesson without the exemplars that the other painted images contradict (see
        ``strokes.uncontradicted``); unchanged where it keeps no patches to check with (made by an earlier
        version, or from one image), or where every exemplar would go."""
        if not self._can_fit() or self.references is None or len(np.unique(self.image_ids)) < 2:
            return self
        from .strokes import uncontradicted

        keep = uncontradicted(*(torch.from_numpy(a) for a in (
            self.features, self.labels, self.image_ids, self.image_means, self.covariance, self.references,
            self.reference_classes, self.reference_ids))).numpy()
        if keep.all() or not keep.any():
            return self
        return replace(self, features=self.features[keep], labels=self.labels[keep], image_ids=self.image_ids[keep])

    def fitted(self) -> "Lesson":
        """This lesson checked (:meth:`checked`) and with its class offsets fitted on its exemplars (see
        ``strokes.lesson_offsets``); unchanged where it does not record the painted images (a lesson saved before
        offsets existed, or from one image)."""
        if not self._can_fit():
            return self
        self = self.checked()
        from .strokes import lesson_offsets

        queries = torch.tensor([k for k, synonyms in enumerate(self.classes) for _ in synonyms])
        arguments = (torch.from_numpy(self.features), torch.from_numpy(self.labels), torch.from_numpy(self.image_ids),
                     torch.from_numpy(self.image_means), torch.from_numpy(self.covariance), torch.from_numpy(self.text),
                     queries, len(self.classes), self.logit_scale)
        offsets = lesson_offsets(*arguments)
        if offsets is None:
            return self
        unsnapped = None if self.pixels is None else lesson_offsets(*arguments, pixels=self.pixels)
        return replace(self, class_offsets=offsets.numpy(),
                       unsnapped_offsets=None if unsnapped is None else unsnapped.numpy())

    def combined(self, other: "Lesson", fit: bool = True) -> "Lesson":
        """One lesson from two made with the same model and classes (strokes on several images).

        Its exemplars are both lessons'; its class offsets are fitted anew on all of them (none where
        either lesson does not record its painted images: one saved before offsets existed). With
        ``fit=False`` it has none yet: :meth:`fitted` fits them later (e.g. off napari's main thread)."""
        self._check_identity(other.model, other.weights, other.method, other.windows, "the other lesson")
        if [c[0] for c in other.classes] != self.class_names:
            raise LessonError(f"The lessons are for other classes ({', '.join(other.class_names)} against "
                              f"{', '.join(self.class_names)}).")
        covariance, images = None, 0
        if self.covariance is not None and other.covariance is not None:  # averaged over all their images
            images = self.images + other.images
            covariance = ((self.covariance.astype(np.float64) * self.images
                           + other.covariance.astype(np.float64) * other.images) / images).astype(np.float32)
        image_ids = image_means = None
        checking = (None, None, None)
        if self._can_fit() and other._can_fit():
            image_ids = np.concatenate([self.image_ids, other.image_ids + len(self.image_means)])
            image_means = np.concatenate([self.image_means, other.image_means])
            if self.references is not None and other.references is not None:
                checking = (np.concatenate([self.references, other.references]),
                            np.concatenate([self.reference_classes, other.reference_classes]),
                            np.concatenate([self.reference_ids, other.reference_ids + len(self.image_means)]))
        pixels = None
        if image_ids is not None and self.pixels is not None and other.pixels is not None:
            pixels = PixelSamples.concatenate([self.pixels, other.pixels], [0, len(self.image_means)])
        joined = Lesson(self.classes, np.concatenate([self.features, other.features]),
                        np.concatenate([self.labels, other.labels]), self.model, self.weights, self.method,
                        self.windows, covariance, images, None, image_ids, image_means,
                        self.text if image_ids is not None else None, self.logit_scale, *checking, pixels=pixels)
        return joined.fitted() if fit else joined

    def _check_identity(self, model: str, weights: str, method: str, windows: tuple, what: str) -> None:
        if (model, weights) != (self.model, self.weights):
            raise LessonError(f"This lesson was made with the model {self.model} ({_weights_words(self.weights)}); "
                              f"{what} uses {model} ({_weights_words(weights)}). Strokes teach one model only: "
                              "use the model the lesson was made with.")
        if method != self.method:
            raise LessonError(f"This lesson was made with the method {self.method}; {what} uses {method}.")
        if tuple(windows) != tuple(self.windows):
            raise LessonError("This lesson was made with other window settings (short side, crop, stride "
                              f"{self.windows}; {what}: {tuple(windows)}).")

    def exemplars_for(self, segmenter, classes: Sequence, options, method: str):
        """The lesson's exemplars for a run with ``classes`` (mapped by name: any order), or a clear error."""
        from .strokes import Exemplars

        self._check_identity(segmenter.model.name, segmenter.model.weights_id, method,
                             (options.short_side, options.crop, options.stride), "this run")
        run_names = [c.name for c in classes]
        if sorted(run_names) != sorted(self.class_names):
            missing = [n for n in self.class_names if n not in run_names]
            extra = [n for n in run_names if n not in self.class_names]
            detail = "; ".join(part for part in (
                f"the run lacks {', '.join(missing)}" if missing else "",
                f"the lesson does not know {', '.join(extra)}" if extra else "") if part)
            raise LessonError(f"This lesson is for the classes {', '.join(self.class_names)}: {detail}. "
                              "Use the same class names (in any order).")
        order = np.array([run_names.index(name) for name in self.class_names])
        features = torch.from_numpy(self.features)
        if features.shape[1] != segmenter.model.clip.visual.output_dim:
            raise LessonError(f"This lesson's exemplars have {features.shape[1]} values each; the model gives "
                              f"{segmenter.model.clip.visual.output_dim}.")
        covariance = None if self.covariance is None else torch.from_numpy(self.covariance)
        def in_run_order(values):
            if values is None:
                return None
            ordered = torch.zeros(len(classes))
            ordered[torch.from_numpy(order)] = torch.from_numpy(values).float()
            return ordered

        return Exemplars(features, torch.from_numpy(order[self.labels]), len(classes), covariance=covariance,
                         images=self.images if covariance is not None else 0,
                         offsets=in_run_order(self.class_offsets),
                         unsnapped_offsets=in_run_order(self.unsnapped_offsets))


_JOINED: dict = {}


def _is_covariance(matrix: np.ndarray) -> bool:
    """Symmetric (up to rounding) with a non-negative diagonal, as any average of patch covariances is."""
    matrix = matrix.astype(np.float64)
    scale = float(np.abs(matrix).max()) if matrix.size else 0.0
    return bool(np.all(np.diag(matrix) >= 0) and np.abs(matrix - matrix.T).max(initial=0.0) <= 1e-4 * scale)


def joined(first: Lesson, second: Lesson) -> Lesson:
    """``first.combined(second)``, kept for the last few pairs: a session's widget joins the same lessons for every
    run, and fitting the class offsets anew each time would slow live re-runs."""
    key = (first.fingerprint(), second.fingerprint(), first._can_fit(), second._can_fit(),
           first.references is not None, second.references is not None)  # checked only with them
    if key not in _JOINED:
        _JOINED[key] = first.combined(second)
        while len(_JOINED) > 8:
            _JOINED.pop(next(iter(_JOINED)))
    return _JOINED[key]


def check_lesson(lesson) -> Lesson | None:
    """``lesson`` as a :class:`Lesson` (a path is loaded), None for None."""
    if lesson is None or isinstance(lesson, Lesson):
        return lesson
    if isinstance(lesson, (str, os.PathLike)):
        return Lesson.load(lesson)
    raise InvalidOptionError(f"lesson={lesson!r} is not a lesson: pass a Lesson, a path to a saved one, or None.")


def _weights_words(weights: str) -> str:
    kind, _, value = weights.partition(":")
    if kind == "file":
        return f"a weights file with content {value[:12]}"
    if kind == "bundled":
        return "its bundled weights"
    return f"weights {value}" if value else weights
