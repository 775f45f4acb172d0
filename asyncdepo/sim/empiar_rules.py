"""What the EMPIAR simulator's server checks, written from the server's side and in its own words.

A test server must not share the client's code paths: if the client's validator and the server's were one
function, a bug in it would pass both sides unnoticed. So the rules below restate, independently of
``asyncdepo.adapters.empiar``, what EMPIAR's deposition API refuses, in the manner of the Django REST framework
serializers such a server runs on: every field has a type, a required flag and limits; a problem is reported
under the field's path (``imagesets[0].voxel_type``) with DRF's wording ("This field is required.",
"Ensure this field has no more than 200 characters.").

What is checked (from EMPIAR's published deposition rules): the top-level fields title (10-255 characters),
release_date (RE, EP, HP, HO), experiment_type (1-9, 11, 12, 13), authors, corresponding_author,
principal_investigator, imagesets and citation, all required; each author a name in the ``('Surname',
'INITIALS')`` form with an order_id; each contact a first and last name, organization, e-mail address and
two-letter country code; each image set a name, a directory inside the entry's ``data/`` folder (at most
200 characters, no ``..``, not shared with or nested in another image set's), category, header and data
formats, voxel type (``('Tn', '')`` codes or ``('OT', 'text')``) and the two counts; each citation its
authors, title and the two flags. Unknown fields are ignored, as a DRF serializer does. Thumbnails must be
PNG images of at least 400 x 400 pixels.

Two choices where EMPIAR's rules are silent: a country is accepted when it is two capital letters (the real
list is ISO 3166; a simulator needs no copy of it), and patterns for ORCIDs, DOIs and the like are not
checked (a server that is looser than the client only lets through what the client already refused).
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable
from typing import Any

REQUIRED = "This field is required."
MIN_THUMBNAIL_SIDE = 400
_CODE = re.compile(r"^\('T\d{1,2}', ''\)$|^\('OT', '.+'\)$")
_AUTHOR = re.compile(r"^\('[^'0-9]+', '[^'0-9]+'\)$")
_MAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[A-Za-z0-9-]+$")
_COUNTRY = re.compile(r"^[A-Z]{2}$")

Found = list[tuple[str, str]]
Check = Callable[[Any, str, Found], None]


def _text(*, min_len: int = 0, max_len: int | None = None, pattern: re.Pattern[str] | None = None,
          hint: str = "", choices: tuple[str, ...] = (), nullable: bool = False) -> Check:
    def check(value: Any, path: str, out: Found) -> None:
        if value is None:
            if not nullable:
                out.append((path, "This field may not be null."))
            return
        if not isinstance(value, str):
            out.append((path, "Not a valid string."))
        elif choices and value not in choices:
            out.append((path, f'"{value}" is not a valid choice.'))
        elif not value.strip() and not nullable:
            out.append((path, "This field may not be blank."))
        elif len(value) < min_len:
            out.append((path, f"Ensure this field has at least {min_len} characters."))
        elif max_len is not None and len(value) > max_len:
            out.append((path, f"Ensure this field has no more than {max_len} characters."))
        elif pattern is not None and not pattern.search(value):
            out.append((path, f"Enter a valid value{': ' + hint if hint else ''}."))
    return check


def _integer(choices: tuple[int, ...] = ()) -> Check:
    def check(value: Any, path: str, out: Found) -> None:
        if isinstance(value, bool) or not isinstance(value, int):
            out.append((path, "A valid integer is required."))
        elif choices and value not in choices:
            out.append((path, f'"{value}" is not a valid choice.'))
    return check


def _boolean(value: Any, path: str, out: Found) -> None:
    if not isinstance(value, bool):
        out.append((path, "Must be a valid boolean."))


def _many(item: Check, *, at_least: int = 0) -> Check:
    def check(value: Any, path: str, out: Found) -> None:
        if not isinstance(value, list):
            out.append((path, f'Expected a list of items but got type "{type(value).__name__}".'))
            return
        if len(value) < at_least:
            out.append((path, "This list may not be empty."))
        for i, element in enumerate(value):
            item(element, f"{path}[{i}]", out)
    return check


def _record(required: dict[str, Check], optional: dict[str, Check] | None = None) -> Check:
    def check(value: Any, path: str, out: Found) -> None:
        if not isinstance(value, dict):
            out.append((path, "Invalid data. Expected a dictionary."))
            return
        for name, field in required.items():
            where = f"{path}.{name}" if path else name
            if name not in value:
                out.append((where, REQUIRED))
            else:
                field(value[name], where, out)
        for name, field in (optional or {}).items():
            if name in value:
                field(value[name], f"{path}.{name}" if path else name, out)
    return check


_PERSON = _record({"name": _text(pattern=_AUTHOR, hint="('Surname', 'INITIALS')"), "order_id": _integer()})
_CONTACT = _record({
    "first_name": _text(max_len=60), "last_name": _text(max_len=60), "organization": _text(max_len=255),
    "email": _text(pattern=_MAIL, hint="an e-mail address"),
    "country": _text(pattern=_COUNTRY, hint="a two-letter country code"),
})
_IMAGESET = _record({
    "name": _text(max_len=200), "directory": _text(max_len=200), "category": _text(pattern=_CODE),
    "header_format": _text(pattern=_CODE), "data_format": _text(pattern=_CODE), "voxel_type": _text(pattern=_CODE),
    "num_images_or_tilt_series": _integer(), "frames_per_image": _integer(),
})
_CITATION = _record({"authors": _many(_PERSON, at_least=1), "published": _boolean, "j_or_nj_citation": _boolean,
                     "title": _text(max_len=255)},
                    {"editors": _many(_PERSON)})
_DEPOSITION = _record({
    "title": _text(min_len=10, max_len=255),
    "release_date": _text(choices=("RE", "EP", "HP", "HO")),
    "experiment_type": _integer(choices=(1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 13)),
    "authors": _many(_PERSON, at_least=1),
    "corresponding_author": _CONTACT,
    "principal_investigator": _many(_CONTACT, at_least=1),
    "imagesets": _many(_IMAGESET, at_least=1),
    "citation": _many(_CITATION, at_least=1),
})


def inside_data(directory: str) -> str | None:
    """Where an image set's ``directory`` lies under the entry's ``data/`` folder (``"/data/a/b/"`` ->
    ``"a/b"``), or None when it lies elsewhere (another root, ``..``, a backslash, ``data`` itself)."""
    if "\\" in directory:
        return None
    steps = [s for s in directory.strip().strip("/").split("/") if s and s != "."]
    if len(steps) < 2 or steps[0] != "data" or ".." in steps:
        return None
    return "/".join(steps[1:])


def _directories(doc: dict[str, Any], out: Found) -> None:
    """Each image set's directory lies in ``data/`` and owns its files alone (no duplicate, no nesting)."""
    taken: list[tuple[str, int]] = []
    sets = doc.get("imagesets")
    for i, imageset in enumerate(sets if isinstance(sets, list) else []):
        directory = imageset.get("directory") if isinstance(imageset, dict) else None
        if not isinstance(directory, str):
            continue
        path = f"imagesets[{i}].directory"
        where = inside_data(directory)
        if where is None:
            out.append((path, f'"{directory}" is not a folder inside data/.'))
            continue
        for other, j in taken:
            if where == other or where.startswith(other + "/") or other.startswith(where + "/"):
                out.append((path, f'"{directory}" overlaps the directory of imagesets[{j}].'))
        taken.append((where, i))


def deposition_errors(doc: Any) -> Found:
    """Every ``(field path, message)`` the server refuses ``doc`` for, in document order; empty when valid."""
    out: Found = []
    _DEPOSITION(doc, "", out)
    if isinstance(doc, dict):
        _directories(doc, out)
    return out


def thumbnail_problem(data: bytes) -> str | None:
    """Why ``data`` is no acceptable thumbnail (not a PNG, or smaller than 400 x 400), or None.

    The size is read from the PNG's IHDR chunk, which the format puts first, right after the signature."""
    if len(data) < 24 or data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        return "The thumbnail must be a PNG image."
    width, height = struct.unpack(">II", data[16:24])
    if width < MIN_THUMBNAIL_SIDE or height < MIN_THUMBNAIL_SIDE:
        return f"The thumbnail must be at least 400 x 400 pixels (got {width} x {height})."
    return None
