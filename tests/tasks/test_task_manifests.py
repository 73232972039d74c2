"""`sdedit manifest`: folders of images to manifests, with masks matched by name and labels."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from tasks.manifests import manifest_records, write_manifest
from tasks.sources import folder_rows, image_id, list_images


def test_ids_are_safe_file_names_from_relative_paths():
    assert image_id("cats/01.jpg") == "cats__01"
    assert image_id("a b/c&d.e.png") == "a_b__c_d.e"


def test_ids_are_ones_sdedit_run_accepts_for_any_file_name(tmp_path):
    import unicodedata

    from pipeline.manifest import unsafe_id_reason

    names = ["猫.png", "犬.png", unicodedata.normalize("NFD", "café.jpg"), "a" * 240 + ".png",
             "a" * 240 + "b.png", ".thumb.png", ".cache/x.png", "ok.png"]
    for name in names:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        Image.new("RGB", (4, 4)).save(tmp_path / name)
    rows = folder_rows(str(tmp_path))  # hidden files and folders are not the user's images
    ids = [row["id"] for row in rows]
    assert len(rows) == 6 and len(set(ids)) == 6
    assert {"猫", "犬", "café", "ok"} <= set(ids)
    assert all(unsafe_id_reason(row_id) is None for row_id in ids), ids
    long_ids = [row_id for row_id in ids if row_id.startswith("aaa")]
    assert [len(row_id) for row_id in long_ids] == [200, 200]


def test_manifest_has_ids_labels_and_paths_relative_to_itself(photo_folder):
    output = photo_folder / "manifest.parquet"
    assert write_manifest(str(photo_folder), str(output)) == 4
    rows = pq.read_table(output).to_pylist()
    assert list(rows[0]) == ["id", "guide", "task", "source", "label"]
    by_id = {row["id"]: row for row in rows}
    assert by_id["animals__chelsea"]["guide"] == "animals/chelsea.png"
    assert by_id["animals__chelsea"]["label"] == "animals"
    assert by_id["astronaut"]["label"] is None
    for row in rows:
        assert row["task"] == "augmentation" and row["source"] == row["guide"]
        assert (photo_folder / row["guide"]).is_file()


def test_images_outside_the_manifest_folder_get_absolute_paths(photo_folder, tmp_path):
    output = tmp_path / "elsewhere" / "manifest.parquet"
    write_manifest(str(photo_folder / "objects"), str(output), labels=False)
    rows = pq.read_table(output).to_pylist()
    assert [Path(row["guide"]).name for row in rows] == ["coffee.jpg", "rocket.png"]
    assert all(Path(row["guide"]).is_absolute() for row in rows)
    assert "label" not in rows[0]


def test_masks_match_by_relative_path_or_by_stem(photo_folder, tmp_path):
    masks = tmp_path / "masks"
    (masks / "objects").mkdir(parents=True)
    Image.new("L", (64, 48), 255).save(masks / "objects" / "coffee.png")
    Image.new("L", (48, 64), 255).save(masks / "rocket.png")  # matched by stem alone
    Image.new("L", (64, 48), 255).save(masks / "chelsea.png")
    Image.new("L", (64, 64), 255).save(masks / "astronaut.png")
    records = manifest_records(
        str(photo_folder), str(tmp_path / "m.parquet"), "editing", str(masks)
    )
    by_id = {row["id"]: row for row in records}
    assert by_id["objects__coffee"]["mask"] == "masks/objects/coffee.png"  # relative to m.parquet
    assert by_id["objects__rocket"]["mask"] == "masks/rocket.png"
    assert all(row["task"] == "editing" for row in records)


def test_masked_tasks_refuse_images_without_masks(photo_folder, tmp_path):
    masks = tmp_path / "masks"
    masks.mkdir()
    Image.new("L", (64, 48), 255).save(masks / "chelsea.png")
    with pytest.raises(ValueError, match="task 'editing' needs a mask per image; none found for 3"):
        manifest_records(str(photo_folder), str(tmp_path / "m.parquet"), "editing", str(masks))
    records = manifest_records(str(photo_folder), str(tmp_path / "m.parquet"), masks=str(masks))
    assert sum(row["mask"] is not None for row in records) == 1


def test_globs_and_clashing_ids(photo_folder):
    found = list_images(str(photo_folder / "objects" / "*.png"))
    assert [relative for _, relative in found] == ["rocket.png"]
    Image.new("RGB", (8, 8)).save(photo_folder / "astronaut.jpg")
    with pytest.raises(ValueError, match="both map to id 'astronaut'"):
        folder_rows(str(photo_folder))
    with pytest.raises(FileNotFoundError, match="no images"):
        list_images(str(photo_folder / "nothing-*.png"))
