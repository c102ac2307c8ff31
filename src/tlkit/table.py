"""Labels from a table: a CSV/TSV file, a pandas DataFrame or a list of ``(path, label)``.

What fastai's ``ImageDataLoaders.from_csv``/``from_df`` and AutoGluon's ``fit(dataframe)``
take: one row per image, its path (relative to a root folder) and its label. `LabelTableDataset`
is an `ImageFolderDataset` built from such a table, so everything the folder dataset has (the
bad-image scan, the class order, the stratified split, the feature cache, the CLI's
``data.labels``, ``evaluate --split``) works the same.

Columns, found by name (case-insensitive) unless given:

* the path: ``path``, ``filename``, ``file``, ``image``, ``image_path``, else the first column;
* single-label: ``label``, ``class``, ``category``, ``target``, else the second column; a
  value holding ``|`` or ``;`` lists several labels (multi-label, as fastai's
  ``label_delim``);
* multi-label as 0/1 columns (``RBC,WBC,Platelets``): ``label_columns``, or, when no label
  column is found, every column whose values are all 0 or 1 (count columns such as ``n_RBC``
  are left out by that rule);
* ``split``, when present, puts rows in ``train``, ``val`` (also ``valid``, ``validation``) or
  ``test``.

A row that cannot be used (missing or empty path, a file that does not exist, an empty label,
a label outside the given classes, a 0/1 column with another value, an unknown split) is never
dropped silently: it is a `BadRow` with the table's name and line, reported by the dataset's
scan (``bad_images="skip"``) or raised at once (``"error"``).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from tlkit.data import ImageFolderDataset, natural_key
from tlkit.images import MAX_PIXELS, BadImage, ScanReport

__all__ = ["BadRow", "LabelTable", "LabelTableDataset", "read_label_table"]

_PATH_NAMES = ("path", "filename", "file", "image", "image_path", "filepath", "fname")
_LABEL_NAMES = ("label", "labels", "class", "category", "target")
_SPLITS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
_DELIMITERS = ("|", ";")
MAX_TABLE_BYTES = 256 * 2**20
"""Largest label table read, bytes (a million rows of paths and labels is about 60 MB)."""


@dataclass(frozen=True)
class BadRow:
    """A row of a label table that cannot be used, and why.

    Attributes:
        source: the table's name (file path, ``"DataFrame"`` or ``"list"``).
        line: its line in the file (1 is the header), or its index + 1 for other sources.
        path: the path the row names (may be empty).
        reason: what is wrong.
    """

    source: str
    line: int
    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.source}:{self.line}: {self.path or '(no path)'}: {self.reason}"


@dataclass
class _Row:
    line: int
    path: str
    labels: tuple[str, ...]
    split: str | None


@dataclass
class LabelTable:
    """A label table read by `read_label_table`: its rows, the labels they use, and the bad rows."""

    source: str
    root: Path
    rows: list[_Row]
    multilabel: bool
    bad: list[BadRow] = field(default_factory=list)

    @property
    def labels(self) -> list[str]:
        """Every label the rows use, in `natural_key` order."""
        return sorted({lab for r in self.rows for lab in r.labels}, key=natural_key)


def _records(source: Any) -> tuple[str, list[str], list[list[str]], int]:
    """``(name, columns, rows as strings, line of the first row)`` of a file, DataFrame or list."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"label table not found: {path}")
        if path.stat().st_size > MAX_TABLE_BYTES:
            raise ValueError(f"{path}: larger than {MAX_TABLE_BYTES // 2**20} MiB; not a label table")
        text = path.read_text(encoding="utf-8-sig", errors="replace")
        delimiter = "\t" if path.suffix.lower() in {".tsv", ".tab"} else ","
        lines = list(csv.reader(io.StringIO(text), delimiter=delimiter))
        if not lines:
            raise ValueError(f"{path}: empty label table (a header line, then one row per image)")
        return str(path), [c.strip() for c in lines[0]], [[v.strip() for v in r] for r in lines[1:]], 2
    if hasattr(source, "columns") and hasattr(source, "itertuples"):  # a pandas DataFrame
        columns = [str(c) for c in source.columns]
        rows = [["" if v is None or v != v else str(v) for v in r] for r in source.itertuples(index=False)]
        return "DataFrame", columns, rows, 1
    if isinstance(source, Sequence):
        rows = [[str(v) for v in r] for r in source]
        return "list", ["path", "label"], rows, 1
    raise TypeError(f"a label table is a CSV/TSV path, a pandas DataFrame or a list of (path, label); "
                    f"got {type(source).__name__}")


def _find(columns: list[str], given: str | None, names: tuple[str, ...], what: str, source: str) -> int | None:
    lower = [c.lower() for c in columns]
    if given is not None:
        if given.lower() not in lower:
            raise ValueError(f"{source}: no {what} column {given!r}; columns: {columns}")
        return lower.index(given.lower())
    return next((lower.index(n) for n in names if n in lower), None)


def _binary_columns(columns: list[str], rows: list[list[str]], skip: set[int]) -> list[int]:
    return [i for i in range(len(columns)) if i not in skip and rows
            and all(len(r) > i and r[i] in {"0", "1", "0.0", "1.0"} for r in rows)]


def read_label_table(source: Any, *, root: str | Path | None = None, path_column: str | None = None,
                     label_column: str | None = None, label_columns: Sequence[str] | None = None) -> LabelTable:
    """Read a label table (see the module docstring for the columns it finds).

    Args:
        source: a ``.csv`` / ``.tsv`` file (UTF-8), a pandas DataFrame, or a list of ``(path, label)``.
        root: the folder relative paths start from; default the table file's folder (the current
            folder for a DataFrame or a list).
        path_column: the column of image paths.
        label_column: the column of labels (``|`` or ``;`` separates several).
        label_columns: 0/1 columns, one per label (multi-label).

    Returns:
        The `LabelTable`; rows with a problem are in ``bad``, not in ``rows``.

    Raises:
        FileNotFoundError: the table file does not exist.
        ValueError: no path column, no label column and no 0/1 columns, a column named that the
            table lacks, or an unreadable table (names it).
    """
    name, columns, raw, first = _records(source)
    base = Path(root) if root is not None else (Path(name).parent if isinstance(source, (str, Path)) else Path.cwd())
    path_i = _find(columns, path_column, _PATH_NAMES, "path", name)
    path_i = 0 if path_i is None else path_i
    split_i = _find(columns, None, ("split",), "split", name)
    if label_columns is not None:
        binary = [_find(columns, c, (), "label", name) for c in label_columns]
        label_i = None
    else:
        label_i = _find(columns, label_column, _LABEL_NAMES, "label", name)
        binary = [] if label_i is not None else _binary_columns(columns, raw, {path_i, *([split_i] if split_i is not None else [])})
        if label_i is None and not binary:
            if len(columns) < 2:
                raise ValueError(f"{name}: no label column (columns: {columns}); name one with label_column")
            label_i = 1 if path_i != 1 else 0
    table = LabelTable(name, base, [], multilabel=bool(binary))
    for k, values in enumerate(raw):
        line = first + k
        if not any(values):
            continue  # a blank line
        row = _parse_row(values, line, table, path_i, label_i, binary, columns, split_i)
        if row is not None:
            table.rows.append(row)
    table.multilabel = table.multilabel or any(len(r.labels) > 1 for r in table.rows)
    return table


def _parse_row(values: list[str], line: int, table: LabelTable, path_i: int, label_i: int | None, binary: list[int],
               columns: list[str], split_i: int | None) -> _Row | None:
    """One row of the table, or ``None`` after recording it in ``table.bad``."""
    get = lambda i: values[i] if i is not None and i < len(values) else ""  # noqa: E731
    path = get(path_i)

    def bad(reason: str) -> None:
        table.bad.append(BadRow(table.source, line, path, reason))

    if not path:
        return bad("empty path")
    split = _SPLITS.get(get(split_i).lower()) if split_i is not None else None
    if split_i is not None and split is None:
        return bad(f"unknown split {get(split_i)!r} (train, val, valid, validation or test)")
    if binary:
        flags = [get(i) for i in binary]
        if any(f not in {"0", "1", "0.0", "1.0"} for f in flags):
            return bad(f"label columns must hold 0 or 1, got {flags}")
        labels = tuple(columns[i] for i, f in zip(binary, flags) if f.startswith("1"))
    else:
        text = get(label_i)
        delimiter = next((d for d in _DELIMITERS if d in text), None)
        labels = tuple(x.strip() for x in text.split(delimiter)) if delimiter else (text,)
        labels = tuple(dict.fromkeys(x for x in labels if x))
        if not labels:
            return bad("empty label")
    file = table.root / path
    if not file.is_file():
        return bad("file not found" + (f" under {table.root}" if not Path(path).is_absolute() else ""))
    return _Row(line, path, labels, split)


class LabelTableDataset(ImageFolderDataset):
    """Images and labels from a table (`read_label_table`): single- or multi-label.

    Items are ``(image, label)`` as for `ImageFolderDataset`; for a multi-label table the label
    is a float32 multi-hot tensor ``(num_classes,)`` (1 for each label of the image). ``samples``
    holds ``(path, class index)``, or ``(path, tuple of class indices)`` when multi-label.

    Args:
        table: a `LabelTable`, or what `read_label_table` reads (a file, a DataFrame, a list).
        root: the folder relative paths start from (see `read_label_table`).
        classes: class names in index order; default every label used, in `natural_key` order.
            A row with a label outside them is a bad row.
        transform: applied to each PIL image.
        split: keep only the rows of this ``split`` column value (``"train"``, ``"val"``,
            ``"test"``); ``None``: every row.
        allow_missing_classes: accept ``classes`` that no row uses (evaluation on a subset).
        bad_images: ``"skip"``: bad rows and unusable files are dropped and listed by `scan`
            (each row with its table line); ``"error"``: bad rows raise here, files in `scan`.
        allow_empty_classes: keep a class no usable row has.
        max_pixels: largest accepted width x height of an image.
        **columns: ``path_column``, ``label_column``, ``label_columns`` (see `read_label_table`).

    Raises:
        FileNotFoundError: the table file does not exist.
        ValueError: as `read_label_table`; with ``bad_images="error"`` any bad row (all listed);
            a class without rows (unless ``allow_empty_classes``).
    """

    def __init__(self, table: Any, root: str | Path | None = None, classes: Sequence[str] | None = None,
                 transform: Any = None, *, split: Literal["train", "val", "test"] | None = None,
                 allow_missing_classes: bool = False, bad_images: Literal["skip", "error"] = "skip",
                 allow_empty_classes: bool = False, max_pixels: int | None = MAX_PIXELS, **columns: Any) -> None:
        if not isinstance(table, LabelTable):
            table = read_label_table(table, root=root, **columns)
        if bad_images not in ("skip", "error"):
            raise ValueError(f"bad_images must be 'skip' or 'error', got {bad_images!r}")
        self.table, self.root, self.multilabel = table, table.root, table.multilabel
        self.classes = list(classes) if classes is not None else table.labels
        self.transform, self.bad_images, self.max_pixels = transform, bad_images, max_pixels
        self.allow_empty_classes, self.draft_size, self.scan_report = allow_empty_classes, None, None
        self.ignored, self.ignored_folders = [], []
        self.bad_rows = list(table.bad)
        index = {c: i for i, c in enumerate(self.classes)}
        self.samples = []
        for row in table.rows:
            if split is not None and row.split != split:
                continue
            unknown = [lab for lab in row.labels if lab not in index]
            if unknown:
                self.bad_rows.append(BadRow(table.source, row.line, row.path,
                                            f"label {unknown[0]!r} is not one of the classes {self.classes[:10]}"))
                continue
            ids = tuple(sorted(index[lab] for lab in row.labels))
            self.samples.append((self.root / row.path, ids if self.multilabel else ids[0]))
        if self.bad_rows and bad_images == "error":
            shown = "\n".join(f"  {b}" for b in self.bad_rows[:10])
            more = f"\n  ... and {len(self.bad_rows) - 10} more" if len(self.bad_rows) > 10 else ""
            raise ValueError(f"{table.source}: {len(self.bad_rows)} bad row(s) (bad_images='error'):\n{shown}{more}")
        used = {i for _, lab in self.samples for i in (lab if self.multilabel else (lab,))}
        empty = [c for i, c in enumerate(self.classes) if i not in used]
        if empty and not (allow_empty_classes or allow_missing_classes):
            raise ValueError(f"{table.source}: no usable row for class(es) {empty[:10]}; pass allow_empty_classes=True "
                             "to keep them")
        if not self.samples:
            raise ValueError(f"{table.source}: no usable row" + (f" in split {split!r}" if split else ""))

    def scan(self) -> ScanReport:
        """Decode every sample once and drop the unusable files, as `ImageFolderDataset.scan`; the
        table's bad rows are listed first in the report, each with its table line.

        Raises:
            BadImageError: ``bad_images="error"`` and some file is bad.
            ValueError: a class left without usable rows (unless ``allow_empty_classes``).
        """
        from tlkit.images import BadImageError, find_bad_images

        bad = find_bad_images([p for p, _ in self.samples], max_pixels=self.max_pixels)
        rows = [BadImage(Path(b.path), f"{b.source}:{b.line}: {b.reason}") for b in self.bad_rows]
        report = ScanReport(self.root, checked=len(self.samples) + len(rows), bad=rows + bad)
        if bad and self.bad_images == "error":
            raise BadImageError(f"{self.table.source}: {len(bad)} unusable image file(s) (bad_images='error'):\n"
                                + report.summary())
        bad_paths = {b.path for b in bad}
        ids = lambda lab: lab if self.multilabel else (lab,)  # noqa: E731
        before = {i for _, lab in self.samples for i in ids(lab)}
        self.samples = [(p, lab) for p, lab in self.samples if p not in bad_paths]
        after = {i for _, lab in self.samples for i in ids(lab)}
        report.empty_classes = [self.classes[i] for i in sorted(before - after)]
        if report.empty_classes and not self.allow_empty_classes:
            raise ValueError(f"{self.table.source}: no usable image left for class(es) {report.empty_classes}:\n"
                             + report.summary())
        self.scan_report = report
        return report

    @property
    def targets(self) -> list:
        """Class index of every sample (a tuple of indices when multi-label), in order."""
        return [label for _, label in self.samples]

    def class_counts(self) -> dict[str, int]:
        """Number of samples per class name (each label of a multi-label image counts)."""
        if not self.multilabel:
            return super().class_counts()
        counts = dict.fromkeys(self.classes, 0)
        for _, labels in self.samples:
            for i in labels:
                counts[self.classes[i]] += 1
        return counts

    def __getitem__(self, index: int):
        item = super().__getitem__(index)
        if item is None or not self.multilabel:
            return item
        x, labels = item
        target = torch.zeros(len(self.classes))
        target[list(labels)] = 1.0
        return x, target
