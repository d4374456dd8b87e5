"""Lessons in the widget: what strokes taught on each image this session, a loaded lesson, saving and loading."""

from __future__ import annotations

from ..errors import LessonError
from ..lessons import Lesson


class SessionLessons:
    """The lessons of this session: one per image whose strokes taught something, and one loaded from a file.

    Images are told apart by their layer's key, not its name: a renamed image keeps its one lesson (rather than
    teaching itself its own strokes twice, once as another image's), and an image given its old name is another."""

    def __init__(self):
        self.taught: dict[str, Lesson] = {}
        self.loaded: Lesson | None = None

    def record(self, image: str, lesson: Lesson | None) -> None:
        """What the strokes on ``image`` (a layer's key) teach now (they accumulate on the image, so this
        replaces)."""
        if lesson is not None:
            self.taught[image] = lesson

    def for_run(self, image: str, share: bool) -> list[Lesson]:
        """The lessons a run on ``image`` (a layer's key) uses: the loaded one, and with ``share`` those of the other
        images."""
        lessons = [self.loaded] if self.loaded is not None else []
        if share:
            lessons += [lesson for key, lesson in self.taught.items() if key != image]
        return lessons

    def to_save(self, image: str | None) -> list[Lesson]:
        """Everything taught, the current image's (a layer's key; or else the newest) lesson first, to join into one
        with :func:`joined_for_saving` (which takes a moment for a large lesson: off the main thread)."""
        keys = list(self.taught)
        first = image if image in self.taught else (keys[-1] if keys else None)
        lessons = [self.taught[key] for key in sorted(keys, key=lambda key: key != first)]  # by key: a
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
