"""Lessons in the widget: what strokes taught on each image this session, a loaded lesson, saving and loading."""

from __future__ import annotations

from ..errors import LessonError
from ..lessons import Lesson


class SessionLessons:
    """The lessons of this session: one per image whose strokes taught something, and one loaded from a file."""

    def __init__(self):
        self.taught: dict[str, Lesson] = {}
        self.loaded: Lesson | None = None

    def record(self, image_name: str, lesson: Lesson | None) -> None:
        """What the strokes on ``image_name`` teach now (they accumulate on the image, so this replaces)."""
        if lesson is not None:
            self.taught[image_name] = lesson

    def forget(self, image_name: str) -> None:
        self.taught.pop(image_name, None)

    def for_run(self, image_name: str, share: bool) -> list[Lesson]:
        """The lessons a run on ``image_name`` uses: the loaded one, and with ``share`` those of the other images."""
        lessons = [self.loaded] if self.loaded is not None else []
        if share:
            lessons += [lesson for name, lesson in self.taught.items() if name != image_name]
        return lessons

    def to_save(self, image_name: str | None) -> list[Lesson]:
        """Everything taught, the current image's (or else the newest) lesson first, to join into one with
        :func:`joined_for_saving` (which takes a moment for a large lesson: off the main thread)."""
        names = list(self.taught)
        first = image_name if image_name in self.taught else (names[-1] if names else None)
        lessons = [self.taught[name] for name in sorted(names, key=lambda name: name != first)]  # by name: a
        # lesson's arrays cannot be compared with ==
        if self.loaded is not None:
            lessons.append(self.loaded)
        if not lessons:
            raise LessonError("Nothing has been taught yet: paint on a result with 'Learn from my edits' on, and run.")
        return lessons


def joined_for_saving(lessons: list[Lesson], segmenter=None) -> Lesson:
    """One lesson of ``lessons`` (those that fit the first), each with the patches that check it made first where
    ``segmenter`` (the model they were taught with) is given, not fitted yet."""
    if segmenter is not None:
        lessons = [lesson.completed(segmenter) for lesson in lessons]
    combined = lessons[0]
    for other in lessons[1:]:
        try:
            combined = combined.combined(other, fit=False)
        except LessonError:
            continue  # another model or other classes: not part of this lesson
    return combined


def classes_text(lesson: Lesson) -> str:
    """The Classes field's text for a lesson's classes (one per line, synonyms after commas)."""
    return "\n".join(", ".join(synonyms) for synonyms in lesson.classes)


def fitted_and_saved(lessons: list[Lesson] | Lesson, path, segmenter=None) -> tuple[Lesson, object]:
    """Join the lessons (:func:`joined_for_saving`), check their exemplars and fit their class offsets, and write
    the lesson to ``path`` (replacing a file there: the file dialog asked)."""
    lesson = joined_for_saving(lessons if isinstance(lessons, list) else [lessons], segmenter).fitted()
    return lesson, lesson.save(path, overwrite=True)
