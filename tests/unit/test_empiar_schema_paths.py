"""The EMPIAR deposition checks (adapters/empiar/schema.py) on real deposition documents, each invalid in one
checked way: the exact message the user gets, and the image-set layout found on a real directory tree."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from asyncdepo.adapters.empiar.schema import Problem, problems, resolve_layout, validate
from asyncdepo.errors import ValidationError
from asyncdepo.sim.datasets import sample_deposition


def doc_with(*dirs: str, **changes: Any) -> dict[str, Any]:
    doc = sample_deposition(*(dirs or ("data/a",)))
    doc.update(changes)
    return doc


def messages(doc: Any) -> list[str]:
    return [str(p) for p in problems(doc)]


def test_a_valid_document_passes_unchanged() -> None:
    doc = doc_with("data/a", "/data/b/")
    doc["imagesets"][0]["pixel_width"] = 1.25
    doc["citation"][0]["year"] = 2024
    assert validate(doc) is doc


def test_not_an_object() -> None:
    assert problems(["title"]) == [Problem("(document)", "must be a JSON object")]
    with pytest.raises(ValidationError) as info:
        validate("a deposition")
    assert str(info.value) == "(document): must be a JSON object" and info.value.hint is None


def test_limits_of_strings_and_numbers() -> None:
    doc = doc_with(title="x" * 256)
    doc["citation"][0]["year"] = 999
    doc["citation"].append({**doc["citation"][0], "year": 10000})
    doc["imagesets"][0]["pixel_width"] = "0.5 nm"
    assert messages(doc) == [
        "title: must be at most 255 characters (has 256)",
        "imagesets[0].pixel_width: must be null or a number, not str",
        "citation[0].year: must be at least 1000",
        "citation[1].year: must be at most 9999",
    ]


def test_required_fields_at_the_top_and_nested() -> None:
    doc = doc_with()
    del doc["title"]
    doc["corresponding_author"] = {k: v for k, v in doc["corresponding_author"].items() if k != "email"}
    del doc["imagesets"][0]["voxel_type"]
    assert messages(doc) == ["title: is required", "corresponding_author.email: is required",
                             "imagesets[0].voxel_type: is required"]


def test_imagesets_of_the_wrong_shape() -> None:
    assert messages(doc_with(imagesets={"directory": "data/a"})) == [
        "imagesets: must be an array, not dict"]
    doc = doc_with("data/a", "data/b")
    doc["imagesets"][0]["directory"] = 5
    doc["imagesets"][1] = "data/b"
    assert messages(doc) == ["imagesets[0].directory: must be a string, not int",
                             "imagesets[1]: must be an object, not str"]


def test_directories_outside_data_shared_or_nested() -> None:
    assert messages(doc_with("data/a", "/data/a/")) == [
        "imagesets[1].directory: '/data/a/' is also the directory of imagesets[0]"]
    assert messages(doc_with("data/a", "data/a/b")) == [
        ("imagesets[1].directory: 'data/a/b' and imagesets[0].directory are nested; each file must belong to one "
        "image set")]
    assert messages(doc_with("data/a/b/c", "data/a")) == [
        ("imagesets[1].directory: 'data/a' and imagesets[0].directory are nested; each file must belong to one "
        "image set")]
    assert messages(doc_with("data/../etc")) == [
        "imagesets[0].directory: 'data/../etc' must be a folder inside data/, e.g. 'data/micrographs'"]


def test_first_problem_is_the_error_the_others_its_hint() -> None:
    doc = doc_with(title="short", release_date="SOON")
    with pytest.raises(ValidationError) as info:
        validate(doc)
    assert (info.value.field, str(info.value)) == ("title", "title: must be at least 10 characters (has 5)")
    assert info.value.hint == "also: release_date: 'SOON' is not allowed; expected RE, EP, HP, HO"

    many = doc_with(*(f"data/s{i}" for i in range(12)))
    for imageset in many["imagesets"]:
        imageset["frames_per_image"] = "one"
    with pytest.raises(ValidationError) as info:
        validate(many)
    assert str(info.value) == "imagesets[0].frames_per_image: must be an integer, not str"
    shown = "; ".join(f"imagesets[{i}].frames_per_image: must be an integer, not str" for i in range(1, 10))
    assert info.value.hint == f"also: {shown}; and 2 more"


def tree(root: Path, *files: str) -> None:
    for rel in files:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(rel.encode())


def test_layout_of_nested_image_sets_and_the_files_beside_them(tmp_path: Path) -> None:
    data = tmp_path / "DATA"
    tree(data, "grid1/set/a.mrc", "grid1/notes.txt", "grid1/logs/run.log", "grid2/set/b.mrc", "README")
    doc = sample_deposition("data/grid1/set", "data/grid2/set")
    layout = resolve_layout(doc, data)
    assert layout.base == ""  # DATA holds the content of data/
    assert [(s.remote, s.local) for s in layout.imagesets] == [("grid1/set", data / "grid1/set"),
                                                               ("grid2/set", data / "grid2/set")]
    assert layout.extras == (("", (data / "README",)),
                             ("grid1", (data / "grid1/logs", data / "grid1/notes.txt")))


def test_layout_refuses_a_data_that_is_not_a_folder(tmp_path: Path) -> None:
    (tmp_path / "DATA").write_bytes(b"a file")
    with pytest.raises(ValidationError) as info:
        resolve_layout(sample_deposition("data/a"), tmp_path / "DATA")
    assert str(info.value) == f"DATA: {tmp_path / 'DATA'} is not a folder holding the image-set directories"
