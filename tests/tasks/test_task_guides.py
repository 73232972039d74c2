"""Guide builders: per-row building without Ray, and the Ray Data job writing a manifest."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw
from task_fixtures import distinct_colours, photo, png_bytes

from pipeline.config import RunConfig
from tasks.guides import (
    CompositeOptions,
    EditOptions,
    GuideJob,
    StrokeOptions,
    build_guides,
    build_one,
    draw_foregrounds,
)
from tasks.regions import Box
from tasks.sources import folder_rows, manifest_rows


def read_manifest(path: str) -> list[dict]:
    return pq.read_table(path).to_pylist()


def test_build_one_writes_a_stroke_guide_without_ray(tmp_path):
    source = tmp_path / "cat.png"
    photo("chelsea").save(source)
    job = GuideJob("synthesis", str(tmp_path / "out"), StrokeOptions(palette_size=5))
    (tmp_path / "out" / "guides").mkdir(parents=True)
    result = build_one({"index": 0, "id": "cat", "source": str(source)}, job)
    assert result == {"index": 0, "guide": "guides/cat.png", "mask": None, "error": None}
    guide = Image.open(tmp_path / "out" / "guides" / "cat.png")
    assert guide.size == (64, 48) and distinct_colours(guide) <= 5


def test_build_one_reports_unreadable_images_with_row_and_uri(tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    job = GuideJob("synthesis", str(tmp_path / "out"), StrokeOptions())
    result = build_one({"index": 3, "id": "broken", "source": str(broken)}, job)
    assert result["guide"] is None and result["index"] == 3
    assert result["error"].startswith(f"row 3 (id 'broken', source={broken}): ")
    missing = build_one({"index": 4, "id": "gone", "source": str(tmp_path / "gone.png")}, job)
    assert "FileNotFoundError" in missing["error"]


def build_from(tmp_path: Path, job: GuideJob, **images: Image.Image) -> tuple[dict, Path]:
    """Save `images` as PNGs named by their key, build row "x" and return (result, OUTPUT)."""
    row = {"index": 0, "id": "x"}
    for key, image in images.items():
        image.save(tmp_path / f"{key}.png")
        row[key] = str(tmp_path / f"{key}.png")
    for folder in ("guides", "masks"):
        (Path(job.output) / folder).mkdir(parents=True, exist_ok=True)
    return build_one(row, job), Path(job.output)


def emoji(size: tuple[int, int] = (32, 32)) -> Image.Image:
    """An opaque red disc on a fully transparent background (RGB under alpha is black)."""
    image = Image.new("RGBA", size, (0, 0, 0, 0))
    ImageDraw.Draw(image).ellipse((8, 8, 23, 23), fill=(220, 30, 30, 255))
    return image


def test_transparent_backgrounds_become_white_in_stroke_guides(tmp_path):
    job = GuideJob("synthesis", str(tmp_path / "out"), StrokeOptions(stroke_size=3))
    result, output = build_from(tmp_path, job, source=emoji())
    assert result["error"] is None
    guide = np.asarray(Image.open(output / result["guide"]))
    assert guide.shape == (32, 32, 3)
    assert guide[0, 0].tolist() == [255, 255, 255] and guide[31, 31].tolist() == [255, 255, 255]
    assert guide[16, 16].tolist() == [220, 30, 30]
    assert not (guide == 0).all(axis=2).any()  # no black left from the transparent pixels


def test_transparent_backgrounds_become_white_outside_edit_masks(tmp_path):
    job = GuideJob("editing", str(tmp_path / "out"), EditOptions(box=Box(0, 0, 4, 4)))
    result, output = build_from(tmp_path, job, source=emoji())
    guide = np.asarray(Image.open(output / result["guide"]))
    mask = np.asarray(Image.open(output / result["mask"]))
    corner = guide[mask == 0][0]
    assert corner.tolist() == [255, 255, 255] and guide[31, 31].tolist() == [255, 255, 255]


def sixteen_bit(left: int, right: int, size: tuple[int, int] = (16, 16)) -> Image.Image:
    """A 16-bit grayscale ("I;16") image: `left` in the left half, `right` in the right half."""
    values = np.full(size[::-1], left, dtype=np.uint16)
    values[:, size[0] // 2 :] = right
    image = Image.fromarray(values)
    assert image.mode == "I;16"
    return image


def test_sixteen_bit_sources_are_scaled_to_eight_bits(tmp_path):
    job = GuideJob("synthesis", str(tmp_path / "out"), StrokeOptions(stroke_size=1))
    result, output = build_from(tmp_path, job, source=sixteen_bit(65535, 100 * 257))
    guide = np.asarray(Image.open(output / result["guide"]))
    assert guide[0, 0].tolist() == [255, 255, 255]
    assert guide[0, 15].tolist() == [100, 100, 100]  # scaled by 1/257, not clipped to 255


def test_sixteen_bit_masks_are_scaled_before_thresholding(tmp_path):
    job = GuideJob("editing", str(tmp_path / "out"), EditOptions())
    source = photo("chelsea", (16, 16))
    result, output = build_from(tmp_path, job, source=source, mask=sixteen_bit(65535, 100 * 257))
    mask = np.asarray(Image.open(output / result["mask"]))
    assert mask.dtype == np.uint8
    assert (mask[:, :8] == 255).all() and (mask[:, 8:] == 0).all()  # 100 <= 127: keep


def test_corrupt_and_oversized_files_become_error_records(tmp_path):
    job = GuideJob("synthesis", str(tmp_path / "out"), StrokeOptions())
    (tmp_path / "source.png").write_bytes(png_bytes(photo("chelsea"))[:100])
    result = build_one({"index": 7, "id": "cut", "source": str(tmp_path / "source.png")}, job)
    assert result["index"] == 7 and result["guide"] is None
    assert f"cannot decode {tmp_path / 'source.png'}" in result["error"]
    assert "expected a complete PNG" in result["error"]
    small = GuideJob("synthesis", str(tmp_path / "out"), StrokeOptions(), max_pixels=1000)
    result, _ = build_from(tmp_path, small, source=photo("chelsea"))  # 64 x 48 = 3072 pixels
    assert result["guide"] is None
    assert "source.png is 64x48 = 3072 pixels, over the limit of 1000" in result["error"]


def test_the_pixel_limit_defaults_to_the_runs():
    job = GuideJob("synthesis", "out", StrokeOptions())
    assert job.max_pixels == RunConfig.max_pixels


def test_drawn_foregrounds_are_other_images_and_repeat_per_seed():
    rows = [{"id": f"img{i}", "source": f"/data/{i}.png"} for i in range(5)]
    paired = draw_foregrounds(rows, seed=1)
    assert all(row["foreground"] != row["source"] for row in paired)
    assert paired == draw_foregrounds(rows, seed=1)
    given = [{**rows[0], "foreground": "/data/given.png"}, rows[1]]
    assert draw_foregrounds(given, seed=1)[0]["foreground"] == "/data/given.png"
    with pytest.raises(ValueError, match="at least two images"):
        draw_foregrounds(rows[:1], seed=0)


def test_foregrounds_are_drawn_from_rows_that_have_an_image(no_ray, tmp_path):
    """A row without an image was a partner like any other: the row given it failed with
    `KeyError: 'foreground'`, though its own image was fine."""
    rows = [{"id": f"img{i}", "source": f"/data/{i}.png"} for i in range(4)]
    assert draw_foregrounds(rows, seed=1) == draw_foregrounds(  # pairings without gaps stay
        [*rows, {"id": "none", "source": None}], seed=1)[:4]
    for i in range(2):
        Image.new("RGB", (32, 32), (60 * i, 90, 90)).save(tmp_path / f"{i}.png")
    pq.write_table(pa.table({"id": ["a", "b", "c"], "guide": ["0.png", None, "1.png"]}),
                   tmp_path / "m.parquet")
    report = build_guides(manifest_rows(str(tmp_path / "m.parquet")),
                          GuideJob("compositing", str(tmp_path / "out"), CompositeOptions()))
    assert report.written == 2
    assert report.errors == [("b", "row 1 (id 'b'): the row has no image (its 'source' or "
                                   "'guide' is empty)")]
    alone = [{"id": "a", "source": "/data/a.png"}, {"id": "b", "source": None}]
    assert "foreground" not in draw_foregrounds(alone, seed=0)[0]


def assert_manifest_resolves(manifest: str, task: str, masked: bool) -> list[dict]:
    rows = read_manifest(manifest)
    columns = list(rows[0])
    expected = (
        ["id", "guide", "mask", "task", "source"] if masked else ["id", "guide", "task", "source"]
    )
    assert columns[: len(expected)] == expected
    folder = Path(manifest).parent
    for row in rows:
        assert row["task"] == task
        assert (folder / row["guide"]).is_file() and not Path(row["guide"]).is_absolute()
        assert Path(row["source"]).is_file()
        if masked:
            assert (folder / row["mask"]).is_file()
    return rows


def test_strokes_job_writes_guides_and_a_ready_manifest(ray_local, photo_folder, tmp_path):
    output = tmp_path / "strokes"
    job = GuideJob("synthesis", str(output), StrokeOptions(palette_size=6), batch_size=2)
    report = build_guides(folder_rows(str(photo_folder)), job)
    assert report.written == 4 and report.errors == []
    rows = assert_manifest_resolves(report.manifest, "synthesis", masked=False)
    assert [row["id"] for row in rows] == [
        "animals__chelsea",
        "astronaut",
        "objects__coffee",
        "objects__rocket",
    ]
    assert [row["label"] for row in rows] == ["animals", None, "objects", "objects"]
    for row in rows:
        guide = Image.open(output / row["guide"])
        assert guide.size == Image.open(row["source"]).size and distinct_colours(guide) <= 6


def test_strokes_job_is_deterministic_per_seed(ray_local, photo_folder, tmp_path):
    rows = folder_rows(str(photo_folder))
    outputs = []
    for name, seed in (("a", 4), ("b", 4), ("c", 5)):
        build_guides(rows, GuideJob("synthesis", str(tmp_path / name), StrokeOptions(seed=seed)))
        outputs.append((tmp_path / name / "guides" / "astronaut.png").read_bytes())
    assert outputs[0] == outputs[1]
    assert outputs[0] != outputs[2]


def test_edits_job_keeps_each_photo_outside_its_mask(ray_local, photo_folder, tmp_path):
    output = tmp_path / "edits"
    report = build_guides(
        folder_rows(str(photo_folder)), GuideJob("editing", str(output), EditOptions())
    )
    for row in assert_manifest_resolves(report.manifest, "editing", masked=True):
        guide = np.asarray(Image.open(output / row["guide"]).convert("RGB"))
        mask = np.asarray(Image.open(output / row["mask"]))
        source = np.asarray(Image.open(row["source"]).convert("RGB"))
        assert set(np.unique(mask)) == {0, 255}
        assert np.array_equal(guide[mask == 0], source[mask == 0])


def test_composites_job_pastes_within_the_mask_only(ray_local, photo_folder, tmp_path):
    output = tmp_path / "composites"
    job = GuideJob("compositing", str(output), CompositeOptions(seed=2))
    report = build_guides(folder_rows(str(photo_folder)), job)
    for row in assert_manifest_resolves(report.manifest, "compositing", masked=True):
        assert row["foreground"] != row["source"] and Path(row["foreground"]).is_file()
        guide = np.asarray(Image.open(output / row["guide"]).convert("RGB"))
        mask = np.asarray(Image.open(output / row["mask"]))
        source = np.asarray(Image.open(row["source"]).convert("RGB"))
        assert np.array_equal(guide[mask == 0], source[mask == 0])
        assert not np.array_equal(guide[mask == 255], source[mask == 255])


def test_failed_rows_are_listed_not_dropped(ray_local, photo_folder, tmp_path):
    (photo_folder / "objects" / "truncated.png").write_bytes(
        (photo_folder / "animals" / "chelsea.png").read_bytes()[:200]
    )
    output = tmp_path / "strokes"
    report = build_guides(
        folder_rows(str(photo_folder)), GuideJob("synthesis", str(output), StrokeOptions())
    )
    assert report.written == 4
    assert [row_id for row_id, _ in report.errors] == ["objects__truncated"]
    errors = pq.read_table(output / "guide_errors.parquet").to_pylist()
    assert errors[0]["id"] == "objects__truncated" and "truncated.png" in errors[0]["error"]
    assert "objects__truncated" not in {row["id"] for row in read_manifest(report.manifest)}


@pytest.fixture
def no_ray(monkeypatch):
    """Build rows in this process instead of on Ray workers (the job's other steps run as
    they are), so the driver's checks are tested without starting Ray."""
    from tasks import guides

    def build_here(work: list[dict], job: GuideJob) -> list[dict]:
        return [build_one(row, job) for row in work]

    monkeypatch.setattr(guides, "_build_on_ray", build_here)


def manifest_source(tmp_path: Path, ids: list, **columns: list) -> str:
    """A manifest SOURCE whose row i is a flat image of grey level 20 * i."""
    guides = []
    for index in range(len(ids)):
        flat_grey = Image.new("RGB", (16, 16), (20 * index,) * 3)
        flat_grey.save(tmp_path / f"{index}.png")
        guides.append(f"{index}.png")
    pq.write_table(pa.table({"id": ids, "guide": guides, **columns}), tmp_path / "m.parquet")
    return str(tmp_path / "m.parquet")


def test_manifest_ids_that_cannot_name_a_file_are_one_error_row_each(no_ray, tmp_path):
    longest = "x" * 80 + "猫" * 40  # 200 bytes in UTF-8: fits guides/<id>.png while written
    ids = ["../../escaped", "dup", "dup", None, "", "ok", longest, "x" + longest]
    source = manifest_source(tmp_path, ids)
    output = tmp_path / "out"
    job = GuideJob("synthesis", str(output), StrokeOptions(stroke_size=1))
    report = build_guides(manifest_rows(source), job)
    assert sorted(path.name for path in (output / "guides").iterdir()) == [
        "ok.png", f"{longest}.png"]
    assert not (tmp_path.parent / "escaped.png").exists()
    assert report.written == 2
    assert [row["id"] for row in read_manifest(report.manifest)] == ["ok", longest]
    unsafe = "is unsafe as a file name: it"
    repeated = "appears on 2 rows; every such row is an error (give each row its own id)"
    expected = [
        (0, "../../escaped", f"id '../../escaped' {unsafe} contains a path separator"),
        (1, "dup", f"id 'dup' {repeated}"),
        (2, "dup", f"id 'dup' {repeated}"),
        (3, None, "the id is missing (null)"),
        (4, "", f"id '' {unsafe} is empty"),
        (7, "x" + longest, f"id {'x' + longest!r} {unsafe} takes 201 bytes in UTF-8, over 200"),
    ]
    messages = [f"row {row} (id {row_id!r}, source={tmp_path / f'{row}.png'}): {problem}"
                for row, row_id, problem in expected]
    assert report.errors == [(row_id, message)
                             for (_, row_id, _), message in zip(expected, messages, strict=True)]
    listed = pq.read_table(output / "guide_errors.parquet").to_pylist()
    assert listed == [{"row": row, "id": row_id, "error": message}
                      for (row, row_id, _), message in zip(expected, messages, strict=True)]


def test_integer_ids_become_their_string_form(no_ray, tmp_path):
    source = manifest_source(tmp_path, pa.array([0, 1, None], pa.int64()))
    report = build_guides(manifest_rows(source),
                          GuideJob("synthesis", str(tmp_path / "out"), StrokeOptions()))
    rows = read_manifest(report.manifest)
    assert [(row["id"], row["guide"]) for row in rows] == [("0", "guides/0.png"),
                                                           ("1", "guides/1.png")]
    assert sorted(path.name for path in (tmp_path / "out" / "guides").iterdir()) == [
        "0.png", "1.png"]
    assert report.errors == [
        (None, f"row 2 (id None, source={tmp_path / '2.png'}): the id is missing (null)")]


def test_build_one_refuses_an_unsafe_id_without_writing(tmp_path):
    photo("chelsea").save(tmp_path / "cat.png")
    job = GuideJob("synthesis", str(tmp_path / "a" / "out"), StrokeOptions())
    result = build_one({"index": 5, "id": "../../cat", "source": str(tmp_path / "cat.png")}, job)
    assert result == {"index": 5, "guide": None, "mask": None, "error": (
        f"row 5 (id '../../cat', source={tmp_path / 'cat.png'}): "
        "id '../../cat' is unsafe as a file name: it contains a path separator")}
    assert sorted(path.name for path in tmp_path.rglob("*.png")) == ["cat.png"]


def test_an_interrupted_manifest_write_keeps_the_previous_manifest(no_ray, tmp_path, monkeypatch):
    source = manifest_source(tmp_path, ["a", "b"])
    job = GuideJob("synthesis", str(tmp_path / "out"), StrokeOptions())
    report = build_guides(manifest_rows(source), job)
    before = (tmp_path / "out" / "manifest.parquet").read_bytes()

    def killed(table, where, *args, **kwargs):
        where.write(b"PAR1")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(pq, "write_table", killed)
    with pytest.raises(KeyboardInterrupt):
        build_guides(manifest_rows(source), job)
    assert (tmp_path / "out" / "manifest.parquet").read_bytes() == before
    assert [row["id"] for row in read_manifest(report.manifest)] == ["a", "b"]
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == [
        "guides", "manifest.parquet"]  # the temporary file is not left behind either


def test_a_rerun_replaces_what_an_earlier_run_left_in_output(no_ray, tmp_path):
    source = manifest_rows(manifest_source(tmp_path, ["a", "b"]))
    output = tmp_path / "out"
    build_guides(source, GuideJob("synthesis", str(output), StrokeOptions()))
    (tmp_path / "1.png").write_bytes(b"not a png")
    report = build_guides(source, GuideJob("synthesis", str(output), StrokeOptions()))
    assert [row_id for row_id, _ in report.errors] == ["b"]
    assert [row["id"] for row in read_manifest(report.manifest)] == ["a"]
    report = build_guides(source, GuideJob("synthesis", str(output), StrokeOptions(stroke_size=0)))
    assert report.written == 0 and [row_id for row_id, _ in report.errors] == ["a", "b"]
    assert sorted(path.name for path in output.iterdir()) == ["guide_errors.parquet", "guides"]
    photo("chelsea").save(tmp_path / "1.png")
    report = build_guides(source, GuideJob("synthesis", str(output), StrokeOptions()))
    assert report.written == 2 and report.errors == []
    assert sorted(path.name for path in output.iterdir()) == ["guides", "manifest.parquet"]


def test_error_records_mask_credentials_in_uris(no_ray, tmp_path, monkeypatch):
    from tasks import guides
    from tasks.images import InputError

    def refused(uri, *args, **kwargs):
        raise InputError("read", f"cannot read {uri}: HTTP 403")

    monkeypatch.setattr(guides, "read_image", refused)
    signed = "http://user:pw@127.0.0.1:1/a.png?X-Amz-Signature=SECRETSIG&x=1"
    masked = "http://user:***@127.0.0.1:1/a.png?X-Amz-Signature=***&x=1"
    report = build_guides([{"id": "a", "source": signed}],
                          GuideJob("synthesis", str(tmp_path / "out"), StrokeOptions()))
    message = f"row 0 (id 'a', source={masked}): InputError: cannot read {masked}: HTTP 403"
    assert report.errors == [("a", message)]
    listed = pq.read_table(tmp_path / "out" / "guide_errors.parquet").to_pylist()
    assert listed == [{"row": 0, "id": "a", "error": message}]


def test_only_the_images_a_task_uses_are_read(tmp_path):
    gone = str(tmp_path / "gone.png")
    row = {"index": 0, "id": "x", "mask": gone}
    photo("chelsea").save(tmp_path / "a.png")
    photo("coffee").save(tmp_path / "b.png")
    strokes = GuideJob("synthesis", str(tmp_path / "strokes"), StrokeOptions())
    result = build_one({**row, "source": str(tmp_path / "a.png")}, strokes)
    assert result == {"index": 0, "guide": "guides/x.png", "mask": None, "error": None}
    composites = GuideJob("compositing", str(tmp_path / "composites"), CompositeOptions())
    pair = {**row, "source": str(tmp_path / "a.png"), "foreground": str(tmp_path / "b.png")}
    result = build_one(pair, composites)
    assert result == {"index": 0, "guide": "guides/x.png", "mask": "masks/x.png", "error": None}
    edits = GuideJob("editing", str(tmp_path / "edits"), EditOptions())
    result = build_one({**row, "source": str(tmp_path / "a.png")}, edits)
    assert result["error"].startswith(f"row 0 (id 'x', source={tmp_path / 'a.png'}, mask={gone})")
    assert "FileNotFoundError" in result["error"]


def test_a_pass_through_index_column_is_kept(no_ray, tmp_path):
    source = manifest_source(tmp_path, ["a", "b"], index=[10, 20], label=["p", "q"])
    report = build_guides(manifest_rows(source),
                          GuideJob("synthesis", str(tmp_path / "out"), StrokeOptions()))
    rows = read_manifest(report.manifest)
    assert [(row["id"], row["index"], row["label"]) for row in rows] == [
        ("a", 10, "p"), ("b", 20, "q")]
    assert list(rows[0]) == ["id", "guide", "task", "source", "index", "label"]


@pytest.mark.parametrize("task", ["synthesis", "editing"])
def test_the_paint_size_reaches_stroke_and_edit_guides(tmp_path, task):
    """--paint-size 16 on a 128-pixel photo: strokes painted at 16 pixels, so the guide is
    made of 8x8 blocks of one colour (the default paints at 64: 2x2 blocks)."""
    options = (StrokeOptions(paint_side=16) if task == "synthesis"
               else EditOptions(box=Box(0, 0, 128, 128), paint_side=16))
    result, out = build_from(tmp_path, GuideJob(task, str(tmp_path / "out"), options),
                             source=photo("chelsea", (128, 128)))
    guide = Image.open(out / result["guide"])
    blocks = guide.resize((16, 16), Image.Resampling.NEAREST).resize((128, 128),
                                                                     Image.Resampling.NEAREST)
    assert np.array_equal(np.asarray(guide), np.asarray(blocks))


def test_a_manifest_row_without_an_image_is_an_error_row_saying_so(no_ray, tmp_path):
    """A null guide became the path "<folder>/None" and a FileNotFoundError for it."""
    Image.new("RGB", (16, 16), (90, 90, 90)).save(tmp_path / "a.png")
    pq.write_table(pa.table({"id": ["a", "b"], "guide": ["a.png", None]}), tmp_path / "m.parquet")
    report = build_guides(manifest_rows(str(tmp_path / "m.parquet")),
                          GuideJob("synthesis", str(tmp_path / "out"), StrokeOptions()))
    assert report.written == 1
    assert report.errors == [("b", "row 1 (id 'b'): the row has no image (its 'source' or "
                                   "'guide' is empty)")]


def test_a_folder_of_manifests_given_as_images_says_what_it_holds(tmp_path, capsys):
    pq.write_table(pa.table({"id": ["a"], "guide": ["a.png"]}), tmp_path / "part-0.parquet")
    with pytest.raises(FileNotFoundError) as error:
        folder_rows(str(tmp_path))
    assert str(error.value) == (
        "no images (files with a suffix Pillow decodes, such as .png, .jpg, .webp or .tif) found "
        f"at {tmp_path}; it holds .parquet files: a manifest SOURCE is one .parquet file")
    assert capsys.readouterr().err == (
        f"note: left out 1 file(s) at {tmp_path} with a suffix of no image format Pillow decodes: "
        ".parquet\n")


def test_relative_sources_in_an_object_store_manifest_resolve_dot_segments():
    from tasks.sources import resolve

    assert resolve("../photos/./a.jpg", "s3://b/runs/m") == "s3://b/runs/photos/a.jpg"
    assert resolve("a.jpg", "s3://b/m") == "s3://b/m/a.jpg"


def test_a_new_row_changes_one_other_rows_composite_partner(no_ray, tmp_path):
    """Partners were drawn by index among the rows with an image: one row more moved most
    rows' partners, and a rerun of `sdedit run` kept the outputs of their old guides."""
    rows = []
    for i in range(9):
        Image.new("RGB", (24, 24), (25 * i, 90, 200 - 20 * i)).save(tmp_path / f"{i}.png")
        rows.append({"id": f"img{i}", "source": str(tmp_path / f"{i}.png")})
    before = {row["id"]: row["foreground"] for row in draw_foregrounds(rows[:8], seed=3)}
    after = {row["id"]: row["foreground"] for row in draw_foregrounds(rows, seed=3)}
    changed = [row_id for row_id in before if after[row_id] != before[row_id]]
    assert len(changed) == 1 and after[changed[0]] == rows[8]["source"]
    fewer = {row["id"]: row["foreground"] for row in draw_foregrounds(rows[1:8], seed=3)}
    assert [row_id for row_id in fewer if fewer[row_id] != before[row_id]] == [
        row_id for row_id in fewer if before[row_id] == rows[0]["source"]]
    for name, part in (("a", rows[:8]), ("b", rows)):
        build_guides(part, GuideJob("compositing", str(tmp_path / name), CompositeOptions(seed=3)))

    def same(row_id: str) -> bool:
        return all((tmp_path / "a" / folder / f"{row_id}.png").read_bytes()
                   == (tmp_path / "b" / folder / f"{row_id}.png").read_bytes()
                   for folder in ("guides", "masks"))

    assert [row_id for row_id in before if not same(row_id)] == changed  # 7 of 8 rows kept


def test_sources_of_a_local_manifest_are_absolute_from_any_directory(no_ray, tmp_path,
                                                                     monkeypatch):
    """A manifest named by a relative path gave sources relative to the current directory,
    which the guides' manifest, read from its own folder or another directory, missed."""
    (tmp_path / "data").mkdir()
    for index, name in enumerate(("a", "b")):
        Image.new("RGB", (16, 16), (100 * index, 50, 50)).save(tmp_path / "data" / f"{name}.png")
    pq.write_table(pa.table({"id": ["a", "b"], "guide": ["a.png", "b.png"],
                             "foreground": ["b.png", None]}), tmp_path / "data" / "m.parquet")
    monkeypatch.chdir(tmp_path)
    report = build_guides(manifest_rows("data/m.parquet"),
                          GuideJob("compositing", str(tmp_path / "out"), CompositeOptions()))
    monkeypatch.chdir(tmp_path / "data")
    a, b = str(tmp_path / "data" / "a.png"), str(tmp_path / "data" / "b.png")
    assert [(row["source"], row["foreground"]) for row in read_manifest(report.manifest)] == [
        (a, b), (b, a)]
    assert [row["source"] for row in manifest_rows(f"file://{tmp_path}/data/m.parquet")] == [a, b]


def test_a_source_mask_with_nothing_to_synthesize_is_the_rows_error(no_ray, tmp_path):
    """A mask of grey 100 binarised to an empty mask: a guide and a no-op row, silently."""
    for name in ("a", "b"):
        photo("chelsea").save(tmp_path / f"{name}.png")
    Image.new("L", (64, 48), 100).save(tmp_path / "a_mask.png")
    Image.new("L", (64, 48), 200).save(tmp_path / "b_mask.png")
    pq.write_table(pa.table({"id": ["a", "b"], "guide": ["a.png", "b.png"],
                             "mask": ["a_mask.png", "b_mask.png"]}), tmp_path / "m.parquet")
    output = tmp_path / "out"
    report = build_guides(manifest_rows(str(tmp_path / "m.parquet")),
                          GuideJob("editing", str(output), EditOptions()))
    message = (f"row 0 (id 'a', source={tmp_path / 'a.png'}, mask={tmp_path / 'a_mask.png'}): "
               "ValueError: the mask has no pixel above 127 (white = synthesize; 0-127 keep), "
               "so the edit would change nothing")
    assert report.written == 1 and report.errors == [("a", message)]
    assert pq.read_table(output / "guide_errors.parquet").to_pylist() == [
        {"row": 0, "id": "a", "error": message}]
    assert sorted(path.name for path in (output / "masks").iterdir()) == ["b.png"]


def test_a_rows_t0_list_reaches_the_guides_manifest(no_ray, tmp_path):
    """`t0` was replaced like guide and mask, though no builder writes one: dropped."""
    from pipeline.manifest import check_columns

    source = manifest_source(tmp_path, ["a", "b", "c"], t0=[[0.3, 0.6], None, [0.5]])
    report = build_guides(manifest_rows(source),
                          GuideJob("synthesis", str(tmp_path / "out"), StrokeOptions()))
    rows = read_manifest(report.manifest)
    assert [(row["id"], row["t0"]) for row in rows] == [
        ("a", [0.3, 0.6]), ("b", None), ("c", [0.5])]
    check_columns(pq.read_schema(report.manifest), report.manifest)  # `sdedit run` takes it
