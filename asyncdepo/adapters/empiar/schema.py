"""Local validation of an EMPIAR deposition JSON, with one message per offending field.

The rules are those of the JSON schema that ships with the reference client (``empiar-depositor`` 1.6b30,
``empiar_deposition.schema.json``), restated here as data so the check runs before any network call and
needs no schema library. Only the keywords that schema uses are implemented: ``type`` (one or several),
``enum``, ``pattern`` (searched, as JSON Schema does), ``minLength``/``maxLength``, ``minimum``/``maximum``,
``minItems``, ``items``, ``properties``, ``required`` and ``format: email``. As in JSON Schema, ``true`` is
not an integer and unknown keys are allowed.

On top of the schema, two rules EMPIAR applies when the data arrive: every image-set ``directory`` lies
inside the entry's ``data/`` folder (``data/...`` or ``/data/...``, no ``..``), and no two image sets share a
directory.

Field paths read like ``imagesets[1].directory`` or ``corresponding_author.email``.
"""

from __future__ import annotations

import dataclasses
import os
import re
import struct
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from asyncdepo.errors import ValidationError

# ISO 3166-1 alpha-2 codes as the schema lists them (with FX and XK).
COUNTRIES = ("AD", "AE", "AF", "AG", "AI", "AL", "AM", "AO", "AQ", "AR", "AS", "AT", "AU", "AW", "AZ", "BA", "BB", "BD", "BE", "BF", "BG", "BH", "BI", "BJ", "BL", "BM", "BN", "BO", "BR", "BS", "BT", "BV", "BW", "BY", "BZ", "CA", "CC", "CD", "CF", "CG", "CH", "CI", "CK", "CL", "CM", "CN", "CO", "CR", "CU", "CV", "CW", "CX", "CY", "CZ", "DE", "DJ", "DK", "DM", "DO", "DZ", "EC", "EE", "EG", "EH", "ER", "ES", "ET", "FI", "FJ", "FK", "FM", "FO", "FR", "FX", "GA", "GB", "GD", "GE", "GF", "GG", "GH", "GI", "GL", "GM", "GN", "GP", "GQ", "GR", "GS", "GT", "GU", "GW", "GY", "HK", "HM", "HN", "HR", "HT", "HU", "ID", "IE", "IL", "IM", "IN", "IO", "IQ", "IR", "IS", "IT", "JE", "JM", "JO", "JP", "KE", "KG", "KH", "KI", "KM", "KN", "KP", "KR", "KW", "KY", "KZ", "LA", "LB", "LC", "LI", "LK", "LR", "LS", "LT", "LU", "LV", "LY", "MA", "MC", "MD", "ME", "MF", "MG", "MH", "MK", "ML", "MM", "MN", "MO", "MP", "MQ", "MR", "MS", "MT", "MU", "MV", "MW", "MX", "MY", "MZ", "NA", "NC", "NE", "NF", "NG", "NI", "NL", "NO", "NP", "NR", "NU", "NZ", "OM", "PA", "PE", "PF", "PG", "PH", "PK", "PL", "PM", "PN", "PR", "PS", "PT", "PW", "PY", "QA", "RE", "RO", "RS", "RU", "RW", "SA", "SB", "SC", "SD", "SE", "SG", "SH", "SI", "SJ", "SK", "SL", "SM", "SN", "SO", "SR", "SS", "ST", "SV", "SX", "SY", "SZ", "TC", "TD", "TF", "TG", "TH", "TJ", "TK", "TL", "TM", "TN", "TO", "TR", "TT", "TV", "TW", "TZ", "UA", "UG", "UM", "US", "UY", "UZ", "VA", "VC", "VE", "VG", "VI", "VN", "VU", "WF", "WS", "XK", "YE", "YT", "ZA", "ZM", "ZW")

_NAME = r"^[^0-9!\"£$%^&*()]+$"
_AUTHOR_NAME = r"^\('[^0-9!\"£$%^&*()]+', '[^0-9!\"£$%^&*()]+'\)$"
_ORCID = r"^([0-9]{4}-){3}[0-9]{3}([0-9]|X)$"
_TYPE_CODE = r"^(\('T(?:1[0-4]|[1-9])', ''\))|\('OT', '[A-Z0-9 ]+'\)$"
_NAME_DESC = "a name without digits or any of !\"£$%^&*()"
_CODE_DESC = "('T1', '') to ('T14', ''), or ('OT', 'OTHER FORMAT') in capitals"

Schema = dict[str, Any]


def _s(max_length: int | None = None, *, null: bool = False, **kw: Any) -> Schema:
    """A string field (optionally nullable) with its limits."""
    rule: Schema = {"type": ("null", "string") if null else "string", **kw}
    if max_length is not None:
        rule["maxLength"] = max_length
    return rule


def _person_list_item() -> Schema:
    return {
        "type": "object",
        "required": ["name", "order_id"],
        "properties": {
            "name": _s(pattern=_AUTHOR_NAME, desc="('Surname', 'INITIALS'), e.g. ('Smith', 'JW')"),
            "order_id": {"type": "integer"},
            "author_orcid": _s(null=True, pattern=_ORCID, desc="an ORCID such as 0000-0002-1825-0097"),
        },
    }


def _contact() -> Schema:
    return {
        "type": "object",
        "required": ["first_name", "last_name", "organization", "email", "country"],
        "properties": {
            "author_orcid": _s(null=True, pattern=_ORCID, desc="an ORCID such as 0000-0002-1825-0097"),
            "first_name": _s(60, pattern=_NAME, desc=_NAME_DESC),
            "middle_name": _s(60, null=True, pattern=_NAME, desc=_NAME_DESC),
            "last_name": _s(60, pattern=_NAME, desc=_NAME_DESC),
            "organization": _s(255),
            "street": _s(255, null=True),
            "town_or_city": _s(60),
            "state_or_province": _s(60, null=True),
            "post_or_zip": _s(60),
            "telephone": _s(60, null=True),
            "fax": _s(60, null=True),
            "email": _s(format="email"),
            "country": {"type": "string", "enum": COUNTRIES},
        },
    }


def _refs(pattern: str) -> Schema:
    return {"type": "array", "items": {"type": "object", "properties": {"name": _s(pattern=pattern)}}}


SCHEMA: Schema = {
    "type": "object",
    "required": [
        "title", "release_date", "experiment_type", "authors", "corresponding_author",
        "principal_investigator", "imagesets", "citation",
    ],
    "properties": {
        "title": _s(255, minLength=10),
        "release_date": {"type": "string", "enum": ("RE", "EP", "HP", "HO")},
        "experiment_type": {"type": "integer", "enum": (1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 13)},
        "scale": _s(pattern=r"^[1-5]$"),
        "cross_references": _refs(r"^(EMD)-[0-9]{4,}$"),
        "biostudies_references": _refs(r"^S-.*$"),
        "idr_references": _refs(r"^idr.*$"),
        "empiar_references": _refs(r"^EMPIAR-\d+$"),
        "workflows": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"url": _s(pattern=r"^https://.+$"), "type": {"type": "integer", "enum": (1,)}},
            },
        },
        "authors": {"type": "array", "minItems": 1, "items": _person_list_item()},
        "corresponding_author": _contact(),
        "principal_investigator": {"type": "array", "minItems": 1, "items": _contact()},
        "workflow_file": {"type": "object", "required": ["path"], "properties": {"path": _s(200, null=True)}},
        "imagesets": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": [
                    "name", "directory", "category", "header_format", "data_format",
                    "num_images_or_tilt_series", "frames_per_image", "voxel_type",
                ],
                "properties": {
                    "name": _s(200),
                    "directory": _s(200, pattern=r"^[^\0]+$"),
                    "category": _s(
                        pattern=r"^(\('T(?:1[0-4]|[1-9])', ''\))|\('OT', '[^\0]+'\)$",
                        desc="('T1', '') to ('T14', ''), or ('OT', 'description')",
                    ),
                    "header_format": _s(pattern=_TYPE_CODE, desc=_CODE_DESC),
                    "data_format": _s(pattern=_TYPE_CODE, desc=_CODE_DESC),
                    "num_images_or_tilt_series": {"type": "integer"},
                    "frames_per_image": {"type": "integer"},
                    "frame_range_min": {"type": ("null", "integer")},
                    "frame_range_max": {"type": ("null", "integer")},
                    "voxel_type": _s(
                        pattern=r"^(\('T([1-9])', ''\))|\('OT', '[A-Z0-9 ]+'\)$",
                        desc="('T1', '') to ('T9', ''), or ('OT', 'OTHER TYPE') in capitals",
                    ),
                    "pixel_width": {"type": ("null", "number")},
                    "pixel_height": {"type": ("null", "number")},
                    "details": {"type": ("null", "string")},
                    "micrographs_file_pattern": _s(200, null=True),
                    "picked_particles_file_pattern": _s(200, null=True),
                    "picked_particles_directory": _s(200, null=True),
                    "image_width": {"type": ("null", "integer")},
                    "image_height": {"type": ("null", "integer")},
                },
            },
        },
        "citation": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["authors", "published", "j_or_nj_citation", "title"],
                "properties": {
                    "authors": {"type": "array", "minItems": 1, "items": _person_list_item()},
                    "editors": {"type": "array", "items": _person_list_item()},
                    "published": {"type": "boolean"},
                    "j_or_nj_citation": {"type": "boolean"},
                    "title": _s(255),
                    "volume": _s(8, null=True),
                    "country": {"type": ("null", "string"), "enum": (None, *COUNTRIES)},
                    "first_page": _s(8, null=True),
                    "last_page": _s(8, null=True),
                    "year": {"type": ("null", "integer"), "minimum": 1000, "maximum": 9999},
                    "language": _s(40, null=True),
                    "doi": _s(80, null=True, pattern=r"^10.[0-9]{4,9}/[-._;()/:A-z0-9]+$"),
                    "pubmedid": _s(20, null=True, pattern=r"^[0-9]{1,8}((.[0-9]+)?)$"),
                    "details": _s(65535, null=True),
                    "book_chapter_title": _s(80, null=True),
                    "publisher": _s(80, null=True),
                    "publication_location": _s(80, null=True),
                    "journal": _s(null=True),
                    "journal_abbreviation": _s(null=True),
                    "issue": _s(null=True),
                },
            },
        },
    },
}

_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_PATTERNS: dict[str, re.Pattern[str]] = {}


@dataclasses.dataclass(frozen=True)
class Problem:
    """One rule broken: ``field`` is a path such as ``imagesets[0].category``."""

    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


_TYPES: dict[str, Callable[[Any], bool]] = {
    "null": lambda v: v is None,
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "array": lambda v: isinstance(v, list),
    "object": lambda v: isinstance(v, dict),
}


def _pattern(text: str) -> re.Pattern[str]:
    if text not in _PATTERNS:
        _PATTERNS[text] = re.compile(text)
    return _PATTERNS[text]


def _check(value: Any, rule: Schema, path: str, out: list[Problem]) -> None:
    # every rule of SCHEMA names its type(s), and every array rule its items
    types = rule["type"]
    names = (types,) if isinstance(types, str) else tuple(types)
    if not any(_TYPES[t](value) for t in names):
        wanted = " or ".join("null" if t == "null" else f"a{'n' if t[0] in 'aeio' else ''} {t}" for t in names)
        out.append(Problem(path, f"must be {wanted}, not {type(value).__name__ if value is not None else 'null'}"))
        return
    if "enum" in rule and value not in rule["enum"]:
        shown = [v for v in rule["enum"] if v is not None]
        choices = ", ".join(map(str, shown)) if len(shown) <= 15 else "a two-letter ISO 3166 country code"
        out.append(Problem(path, f"{value!r} is not allowed; expected {choices}"))
        return
    if isinstance(value, str):
        if "minLength" in rule and len(value) < rule["minLength"]:
            out.append(Problem(path, f"must be at least {rule['minLength']} characters (has {len(value)})"))
        if "maxLength" in rule and len(value) > rule["maxLength"]:
            out.append(Problem(path, f"must be at most {rule['maxLength']} characters (has {len(value)})"))
        if "pattern" in rule and not _pattern(rule["pattern"]).search(value):
            wanted = rule.get("desc") or f"the pattern {rule['pattern']}"
            out.append(Problem(path, f"{value!r} is not in the expected form: {wanted}"))
        if rule.get("format") == "email" and not _EMAIL.match(value):
            out.append(Problem(path, f"{value!r} is not an e-mail address"))
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        if "minimum" in rule and value < rule["minimum"]:
            out.append(Problem(path, f"must be at least {rule['minimum']}"))
        if "maximum" in rule and value > rule["maximum"]:
            out.append(Problem(path, f"must be at most {rule['maximum']}"))
    elif isinstance(value, list):
        if "minItems" in rule and len(value) < rule["minItems"]:
            out.append(Problem(path, f"must have at least {rule['minItems']} item(s)"))
        for i, item in enumerate(value):
            _check(item, rule["items"], f"{path}[{i}]", out)
    elif isinstance(value, dict):
        for key in rule.get("required", ()):
            if key not in value:
                out.append(Problem(f"{path}.{key}" if path else key, "is required"))
        for key, sub in rule.get("properties", {}).items():
            if key in value:
                _check(value[key], sub, f"{path}.{key}" if path else key, out)


def data_relative(directory: str) -> str | None:
    """The image-set ``directory`` relative to the entry's ``data/`` folder (``"/data/a/b"`` -> ``"a/b"``),
    or None when it does not lie inside ``data/`` (absolute elsewhere, ``..``, empty)."""
    parts = [p for p in directory.strip().split("/") if p not in ("", ".")]
    if len(parts) < 2 or parts[0] != "data" or ".." in parts or "\\" in directory:
        return None
    return "/".join(parts[1:])


def problems(doc: Any) -> list[Problem]:
    """Every rule ``doc`` breaks, in document order (empty when it is a valid deposition)."""
    out: list[Problem] = []
    if not isinstance(doc, dict):
        return [Problem("(document)", "must be a JSON object")]
    _check(doc, SCHEMA, "", out)
    seen: dict[str, int] = {}
    imagesets = doc.get("imagesets")
    if isinstance(imagesets, list):
        for i, imageset in enumerate(imagesets):
            directory = imageset.get("directory") if isinstance(imageset, dict) else None
            if not isinstance(directory, str):
                continue
            rel = data_relative(directory)
            field = f"imagesets[{i}].directory"
            if rel is None:
                out.append(Problem(field, f"{directory!r} must be a folder inside data/, e.g. 'data/micrographs'"))
            elif rel in seen:
                out.append(Problem(field, f"{directory!r} is also the directory of imagesets[{seen[rel]}]"))
            else:
                for other, j in seen.items():
                    if rel.startswith(other + "/") or other.startswith(rel + "/"):
                        out.append(Problem(field, f"{directory!r} and imagesets[{j}].directory are nested; "
                                                  "each file must belong to one image set"))
                seen[rel] = i
    return out


def validate(doc: Any) -> Mapping[str, Any]:
    """Return ``doc`` when it is a valid deposition.

    :raises ValidationError: naming the first offending field; the hint lists the others.
    """
    found = problems(doc)
    if not found:
        return doc  # type: ignore[no-any-return]
    first, rest = found[0], found[1:]
    hint = None
    if rest:
        shown = "; ".join(map(str, rest[:9]))
        more = f"; and {len(rest) - 9} more" if len(rest) > 9 else ""
        hint = f"also: {shown}{more}"
    raise ValidationError(first.field, first.message, hint=hint)


# -- the thumbnail ------------------------------------------------------------------------------------------
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MIN_THUMBNAIL = 400  # pixels, both ways


def png_size(data: bytes) -> tuple[int, int] | None:
    """Width and height from the first 24 bytes of a PNG (its IHDR chunk), or None when it is not a PNG."""
    if len(data) < 24 or not data.startswith(PNG_SIGNATURE) or data[12:16] != b"IHDR":
        return None
    width, height = struct.unpack(">II", data[16:24])
    return int(width), int(height)


# -- where the image sets are on disk -----------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ImageSet:
    """One image set: ``remote`` is its folder relative to the entry's ``data/``, ``local`` the folder to send."""

    index: int
    name: str
    directory: str
    remote: str
    local: Path


@dataclasses.dataclass(frozen=True)
class Layout:
    """How DATA maps onto the entry's ``data/`` folder.

    ``base`` is the folder under ``data/`` that DATA itself becomes: ``basename(DATA)`` in the reference
    client's layout (it sends DATA as a whole, so ``data/<name>/...`` appears remotely), or ``""`` when DATA's
    content is the content of ``data/``. ``extras`` are the paths under DATA outside every image set (sent
    too, as the reference client sends all of DATA), grouped by their remote parent folder.
    """

    data: Path
    base: str
    imagesets: tuple[ImageSet, ...]
    extras: tuple[tuple[str, tuple[Path, ...]], ...]


def _has_file(folder: Path) -> bool:
    for _, _, files in os.walk(folder):
        if files:
            return True
    return False


def _extras(root: Path, remote: str, inside: set[Path]) -> list[tuple[str, tuple[Path, ...]]]:
    """Paths under ``root`` that are neither image sets nor lead to one, grouped by remote parent."""
    here: list[Path] = []
    groups: list[tuple[str, tuple[Path, ...]]] = []
    for child in sorted(root.iterdir()):
        if child in inside:
            continue
        if any(child in p.parents for p in inside):
            groups += _extras(child, f"{remote}/{child.name}".strip("/"), inside)
        else:
            here.append(child)
    if here:
        groups.insert(0, (remote, tuple(here)))
    return groups


def resolve_layout(doc: Mapping[str, Any], data: Path) -> Layout:
    """Find every image set's folder under DATA (``doc`` already validated).

    DATA may be laid out as the reference client expects (DATA is sent whole into ``data/``, so an image set
    ``data/<basename(DATA)>/x`` is ``DATA/x``), or hold the content of ``data/`` (``data/x`` is ``DATA/x``).
    The layout that finds more of the folders wins (the reference one on a tie).

    :raises ValidationError: DATA is not a folder, an image set's folder is missing, or holds no file.
    """
    if not data.is_dir():
        raise ValidationError("DATA", f"{data} is not a folder holding the image-set directories")
    entries = [(i, s, data_relative(str(s["directory"])) or "") for i, s in enumerate(doc["imagesets"])]
    name = data.name
    # the layout that finds more of the folders wins (the reference one on a tie), so a missing folder
    # is reported where the user meant it to be
    found_ref = sum((data.parent / r).is_dir() for _, _, r in entries)
    found_content = sum((data / r).is_dir() for _, _, r in entries)
    reference = all(r == name or r.startswith(name + "/") for _, _, r in entries) and found_ref >= found_content
    base = name if reference else ""
    sets = []
    for i, s, rel in entries:
        local = data.parent / rel if reference else data / rel
        field = f"imagesets[{i}].directory"
        if not local.is_dir():
            raise ValidationError(field, f"{s['directory']!r} not found under DATA (looked for {local})",
                                  hint="DATA must hold the image-set folders named in the deposition JSON")
        if not _has_file(local):
            raise ValidationError(field, f"{local} holds no file; EMPIAR refuses empty image sets")
        sets.append(ImageSet(i, str(s["name"]), str(s["directory"]), rel, local))
    inside = {s.local for s in sets}
    extras = tuple(_extras(data, f"{base}", inside)) if data not in inside else ()
    return Layout(data, base, tuple(sets), extras)
