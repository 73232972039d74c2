"""`sdedit manifest`: folders of images to manifests, with masks matched by name and labels."""

from __future__ import annotations

import hashlib
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


def test_masked_tasks_refuse_images_without_masks(photo_folder, tmp_path, capsys):
    masks = tmp_path / "masks"
    masks.mkdir()
    Image.new("L", (64, 48), 255).save(masks / "chelsea.png")
    with pytest.raises(ValueError, match="task 'editing' needs a mask per image; none found for 3"):
        manifest_records(str(photo_folder), str(tmp_path / "m.parquet"), "editing", str(masks))
    capsys.readouterr()
    records = manifest_records(str(photo_folder), str(tmp_path / "m.parquet"), masks=str(masks))
    assert sum(row["mask"] is not None for row in records) == 1
    assert f"3 of 4 images have no mask under {masks}, e.g. " in capsys.readouterr().err


def test_globs_and_clashing_ids(photo_folder):
    found = list_images(str(photo_folder / "objects" / "*.png"))
    assert [relative for _, relative in found] == ["rocket.png"]
    Image.new("RGB", (8, 8)).save(photo_folder / "astronaut.jpg")
    with pytest.raises(ValueError, match="both map to id 'astronaut'"):
        folder_rows(str(photo_folder))
    with pytest.raises(FileNotFoundError, match="no images"):
        list_images(str(photo_folder / "nothing-*.png"))


def test_ids_keep_combining_marks_so_names_stay_apart():
    from pipeline.manifest import unsafe_id_reason

    names = {"हिंदी.png": "हिंदी", "हिंदू.png": "हिंदू", "مُحَمَّد.jpg": "مُحَمَّد",
             "a\u0301 b.png": "\u00e1_b", "x\u0301\u0327.png": "x\u0327\u0301"}
    assert {name: image_id(name) for name in names} == names
    assert all(unsafe_id_reason(row_id) is None for row_id in names.values())


def test_long_non_ascii_ids_are_cut_to_fit_a_file_name(tmp_path):
    from pipeline.manifest import unsafe_id_reason
    from tasks.guides import GuideJob, StrokeOptions, build_one

    relative = "猫" * 80 + "/" + "犬" * 80 + ".png"
    (tmp_path / "src" / ("猫" * 80)).mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "src" / relative)
    [row] = folder_rows(str(tmp_path / "src"))
    digest = hashlib.sha256(relative.encode()).hexdigest()[:16]
    assert row["id"] == "猫" * 61 + f"-{digest}"  # 61 * 3 + 17 = 200 bytes
    assert len(row["id"].encode()) == 200 and unsafe_id_reason(row["id"]) is None
    result = build_one({"index": 0, **row}, GuideJob("synthesis", str(tmp_path / "out"),
                                                     StrokeOptions()))
    assert result == {"index": 0, "guide": f"guides/{row['id']}.png", "mask": None, "error": None}
    assert (tmp_path / "out" / result["guide"]).is_file()


def test_a_folder_named_like_a_glob_is_a_folder(tmp_path):
    for name in ("Photos [2020]", "what?", "star*"):
        (tmp_path / name).mkdir()
        Image.new("RGB", (8, 8)).save(tmp_path / name / "a.png")
        assert list_images(str(tmp_path / name)) == [(str(tmp_path / name / "a.png"), "a.png")]
    assert list_images(str(tmp_path / "what?" / "a.png")) == [
        (str(tmp_path / "what?" / "a.png"), "a.png")]
    assert [relative for _, relative in list_images(str(tmp_path / "*" / "a.png"))] == [
        "Photos [2020]/a.png", "star*/a.png", "what?/a.png"]


def test_a_mask_by_stem_alone_only_where_no_other_could_be_meant(tmp_path):
    for path in ("imgs/cats/01.jpg", "imgs/dogs/01.jpg", "imgs/dogs/02.jpg",
                 "masks/cats/01.png", "masks/02.png"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(tmp_path / path)
    records = manifest_records(str(tmp_path / "imgs"), str(tmp_path / "m.parquet"),
                               masks=str(tmp_path / "masks"))
    assert {row["id"]: row["mask"] for row in records} == {
        "cats__01": "masks/cats/01.png",
        "dogs__01": None,  # masks/cats/01.png is the cat's, not a dog's
        "dogs__02": "masks/02.png",  # a flat folder of masks, one 02 among them
    }
    with pytest.raises(ValueError, match=r"none found for 1 image\(s\), e\.g\. .*dogs/01\.jpg"):
        manifest_records(str(tmp_path / "imgs"), str(tmp_path / "m.parquet"), "editing",
                         str(tmp_path / "masks"))
    Image.new("RGB", (8, 8)).save(tmp_path / "imgs" / "02.jpg")  # two images named 02 now
    records = manifest_records(str(tmp_path / "imgs"), str(tmp_path / "m.parquet"),
                               masks=str(tmp_path / "masks"))
    assert {row["id"]: row["mask"] for row in records}["dogs__02"] is None
    assert {row["id"]: row["mask"] for row in records}["02"] == "masks/02.png"  # by its path


def test_a_masks_folder_inside_the_images_is_not_images(tmp_path):
    for path in ("data/01.jpg", "data/masks/01.png", "data/sub/02.jpg", "data/masks/sub/02.png"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(tmp_path / path)
    records = manifest_records(str(tmp_path / "data"), str(tmp_path / "m.parquet"), "editing",
                               str(tmp_path / "data" / "masks"))
    assert [(row["id"], row["guide"], row["mask"]) for row in records] == [
        ("01", "data/01.jpg", "data/masks/01.png"),
        ("sub__02", "data/sub/02.jpg", "data/masks/sub/02.png"),
    ]


def test_an_output_inside_the_source_is_left_out_of_its_rows(tmp_path):
    for path in ("photos/a.png", "photos/out/guides/a.png", "photos/outside/b.png"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(tmp_path / path)
    rows = folder_rows(str(tmp_path / "photos"), exclude=(str(tmp_path / "photos" / "out"),))
    assert [(row["id"], row["label"]) for row in rows] == [("a", None), ("outside__b", "outside")]
    around = folder_rows(str(tmp_path / "photos" / "out"), exclude=(str(tmp_path / "photos"),))
    assert [row["id"] for row in around] == ["guides__a"]  # a folder around SOURCE: no effect


def test_file_uri_outputs_get_paths_relative_to_themselves(photo_folder, tmp_path):
    output = tmp_path / "m.parquet"
    assert write_manifest(str(photo_folder), f"file://{output}", labels=False) == 4
    assert [row["guide"] for row in pq.read_table(output).to_pylist()] == [
        "photos/animals/chelsea.png", "photos/astronaut.png", "photos/objects/coffee.jpg",
        "photos/objects/rocket.png"]


def test_an_interrupted_write_keeps_the_previous_manifest(photo_folder, tmp_path, monkeypatch):
    output = tmp_path / "m.parquet"
    write_manifest(str(photo_folder), str(output))
    before = output.read_bytes()

    def killed(table, where, *args, **kwargs):
        where.write(b"PAR1")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(pq, "write_table", killed)
    with pytest.raises(KeyboardInterrupt):
        write_manifest(str(photo_folder / "objects"), str(output))
    assert output.read_bytes() == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["m.parquet", "photos"]


def test_every_suffix_pillow_opens_is_an_image_and_other_files_are_counted(tmp_path, capsys):
    """.jfif, .jpe, .ppm, .pgm, .tga and .ico files were left out silently, though Pillow
    (and so `sdedit run`) decodes them."""
    from tasks.images import read_image

    names = ["a.jfif", "b.jpe", "c.ppm", "d.pgm", "e.tga", "f.ico", "g.PNG"]
    for name in names:
        Image.new("RGB", (16, 16), (200, 100, 50)).save(tmp_path / name)
    # .h5: a Pillow stub, never decoded; .MPG: a video Pillow identifies and cannot decode
    for name in ("notes.txt", "README", "cube.h5", "MVI_0002.MPG"):
        (tmp_path / name).write_text("not an image")
    rows = folder_rows(str(tmp_path))
    assert [row["id"] for row in rows] == ["a", "b", "c", "d", "e", "f", "g"]
    assert [read_image(row["source"], {}).size for row in rows] == [(16, 16)] * 7
    assert capsys.readouterr().err == (
        f"note: left out 4 file(s) at {tmp_path} with a suffix of no image format Pillow "
        "decodes: (no suffix), .h5, .mpg, .txt\n")


def test_images_whose_path_holds_a_chain_separator_are_left_out_by_name(tmp_path, capsys):
    """fsspec reads "a::b.png" as the file "a" inside "b.png": such a row could never be read."""
    from tasks.images import InputError, read_image

    for name in ("a::b.png", "ok.png", "c::d.jpg"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    with pytest.raises(InputError, match=f"No such file or directory: '{tmp_path}/a'"):
        read_image(str(tmp_path / "a::b.png"), {})
    assert [row["id"] for row in folder_rows(str(tmp_path))] == ["ok"]
    assert capsys.readouterr().err == (
        f"note: left out 2 image(s) at {tmp_path} whose path holds '::', which fsspec reads as "
        f"a chained URL, so no command can open them (rename them): {tmp_path}/a::b.png, "
        f"{tmp_path}/c::d.jpg\n")


def test_folders_left_out_are_compared_with_dot_segments_resolved(tmp_path):
    """`--masks data/masks/../masks` named the masks folder, but as text it did not start with
    the images' folder: the masks became images."""
    for path in ("data/01.jpg", "data/masks/01.png", "data/out/guides/01.png"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(tmp_path / path)
    records = manifest_records(str(tmp_path / "data"), str(tmp_path / "m.parquet"),
                               masks=f"{tmp_path}/data/masks/../masks")
    assert [(row["id"], row["mask"]) for row in records] == [("01", "data/masks/01.png"),
                                                             ("out__guides__01", None)]
    rows = folder_rows(f"{tmp_path}/data/./", exclude=(f"{tmp_path}/data/masks/../out/",
                                                        f"{tmp_path}/data/masks/."))
    assert [row["id"] for row in rows] == ["01"]
