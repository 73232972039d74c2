"""`sdedit evaluate`: faithfulness numbers on a fake OUTPUT folder with known images."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image
from task_fixtures import flat, output_record, write_output

from pipeline.encode import ENCODERS, encode_image
from tasks.cli import evaluate as evaluate_command
from tasks.evaluate import LOSSLESS_FORMATS, evaluate, faithfulness, format_report
from tasks.outputs import OutputFolder, _decoded

UNIT = 1 / 127.5  # one 8-bit level in [-1, 1] units


def half_mask(size=(16, 16)) -> Image.Image:
    """White (synthesize) on the left half, black (keep) on the right."""
    mask = Image.new("L", size, 0)
    mask.paste(255, (0, 0, size[0] // 2, size[1]))
    return mask


def left_painted(value: int, base: int = 100, size=(16, 16)) -> Image.Image:
    image = flat(base, size)
    image.paste((value, value, value), (0, 0, size[0] // 2, size[1]))
    return image


@pytest.fixture
def known_output(tmp_path):
    """Guides and masks next to a manifest; outputs whose distances are known exactly."""
    (tmp_path / "run" / "guides").mkdir(parents=True)
    flat(100).save(tmp_path / "run" / "guides" / "plain.png")
    flat(100, (32, 32)).save(tmp_path / "run" / "guides" / "large.png")  # resized to 16x16
    half_mask().save(tmp_path / "run" / "guides" / "mask.png")
    broken = left_painted(200)
    broken.putpixel((12, 3), (100, 103, 100))  # a kept pixel changed by 3 levels
    outputs = [
        {"id": "plain", "t0": 0.3, "image": flat(110), "guide": "guides/plain.png"},
        {"id": "plain", "t0": 0.6, "image": flat(150), "guide": "guides/plain.png"},
        {"id": "large", "t0": 0.3, "image": flat(90), "guide": "guides/large.png"},
        {
            "id": "masked",
            "t0": 0.6,
            "image": left_painted(200),
            "guide": "guides/plain.png",
            "mask": "guides/mask.png",
            "l2_to_guide": 0.25,
        },
        {
            "id": "leaky",
            "t0": 0.6,
            "image": broken,
            "guide": "guides/plain.png",
            "mask": "guides/mask.png",
            "l2_to_guide": 0.75,
        },
        {"id": "orphan", "t0": 0.3, "image": flat(0), "guide": "guides/missing.png"},
    ]
    summary = {"config": {"manifest": str(tmp_path / "run" / "manifest.parquet")}}
    return write_output(tmp_path / "out", outputs, summary=summary)


def test_faithfulness_of_single_images():
    assert faithfulness(flat(110), flat(100)).l2_to_guide == pytest.approx((10 * UNIT) ** 2)
    masked = faithfulness(left_painted(200), flat(100), half_mask())
    assert masked.l2_to_guide == pytest.approx(0.5 * (100 * UNIT) ** 2)
    assert masked.change_outside_mask == 0.0 and masked.max_change_outside_mask == 0
    inverted = faithfulness(left_painted(200), flat(100), half_mask().point(lambda v: 255 - v))
    assert inverted.max_change_outside_mask == 100  # polarity: black = keep


def test_guides_and_masks_are_prepared_as_the_pipeline_prepares_them():
    from tasks.images import fit

    rng = np.random.default_rng(0)
    guide = Image.fromarray(rng.integers(0, 256, (60, 160, 3), dtype=np.uint8))  # not square
    output = fit(guide, 32, Image.Resampling.BICUBIC)  # what the pipeline edits against
    assert faithfulness(output, guide).l2_to_guide == 0.0  # centre-cropped, not squashed
    mask = Image.new("L", (160, 60), 0)
    mask.paste(255, (0, 0, 61, 60))  # a binary mask whose edge falls between output pixels
    prepared = np.asarray(fit(mask, 32, Image.Resampling.BILINEAR))
    assert 0 < prepared[prepared > 0].min() < 255  # a grey edge: partly synthesized
    edited = np.asarray(output).copy()
    edited[prepared > 0] = 0  # changed wherever the sampler may change anything
    score = faithfulness(Image.fromarray(edited), guide, mask)
    assert score.change_outside_mask == 0.0 and score.max_change_outside_mask == 0


def test_report_by_t0_has_the_known_numbers(known_output):
    report = evaluate(OutputFolder(str(known_output)))
    assert report["outputs_scored"] == 5 and report["outputs_without_guide"] == 1
    low, high = report["by_t0"]
    assert low["t0"] == 0.3 and low["outputs"] == 2
    assert low["l2_to_guide"] == pytest.approx(((10 * UNIT) ** 2 + (10 * UNIT) ** 2) / 2)
    assert low["masked_outputs"] == 0 and low["change_outside_mask"] is None
    assert high["t0"] == 0.6 and high["outputs"] == 3
    leaky_l2 = 0.5 * (100 * UNIT) ** 2 + (3 * UNIT) ** 2 / (256 * 3)  # mean over RGB values
    expected = ((50 * UNIT) ** 2 + 0.5 * (100 * UNIT) ** 2 + leaky_l2) / 3
    assert high["l2_to_guide"] == pytest.approx(expected)
    assert high["l2_to_guide_reported"] == pytest.approx((0.0 + 0.25 + 0.75) / 3)
    assert high["masked_outputs"] == 2
    assert high["change_outside_mask"] == pytest.approx((3 * UNIT) ** 2 / (128 * 3) / 2)
    assert high["max_change_outside_mask"] == 3
    assert report["exact_keep_outside_mask"] is False


def test_cli_writes_json_and_prints_the_table(known_output):
    result = CliRunner().invoke(evaluate_command, [str(known_output)])
    assert result.exit_code == 0, result.output
    assert "0.300" in result.output and "0.600" in result.output
    assert "guide kept exactly outside every mask: NO" in result.output
    saved = json.loads((known_output / "evaluation.json").read_text())
    assert [group["t0"] for group in saved["by_t0"]] == [0.3, 0.6]


def test_manifest_option_resolves_guides_without_a_summary(known_output, tmp_path):
    (known_output / "summary.json").unlink()
    assert evaluate(OutputFolder(str(known_output)))["outputs_scored"] == 0
    manifest = str(tmp_path / "run" / "manifest.parquet")
    pq.write_table(pa.table({"id": ["plain"], "guide": ["guides/plain.png"]}), manifest)
    out = tmp_path / "report.json"
    result = CliRunner().invoke(
        evaluate_command, [str(known_output), "--manifest", manifest, "--json", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["outputs_scored"] == 5


def test_without_a_manifest_the_message_says_to_pass_one(known_output):
    """While a first run is still writing there is no summary.json: every relative guide is
    unreadable, and the line said only that, not how to read them."""
    (known_output / "summary.json").unlink()
    result = CliRunner().invoke(evaluate_command, [str(known_output)])
    assert result.exit_code == 1, result.output  # a script must not take it for a score
    assert result.output.endswith("Error: none of the 6 outputs could be scored: no readable "
                                  "guide (see above)\n")
    message = " ".join(result.output.split())
    assert "6 outputs had no readable guide URI" in message
    assert "pass --manifest MANIFEST" in message
    saved = json.loads((known_output / "evaluation.json").read_text())
    assert (saved["outputs_scored"], saved["outputs_without_guide"]) == (0, 6)


def test_lossless_formats_are_those_the_pipeline_writes_losslessly():
    """WebP outputs (written lossless) were reported `lossless: false`."""
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
    for name in ENCODERS:
        decoded = np.asarray(Image.open(io.BytesIO(encode_image(pixels.tobytes(), 12, 12, name))))
        assert np.array_equal(decoded, pixels) == (name in LOSSLESS_FORMATS), name


@pytest.mark.parametrize(("image_format", "verdict", "exact"), [
    ("png", "yes", True), ("webp", "yes", True), ("jpeg", "n/a (lossy jpeg)", None)])
def test_exactness_is_judged_on_lossless_outputs_only(tmp_path, image_format, verdict, exact):
    """JPEG compression changes kept pixels by a few levels: the verdict said NO."""
    (tmp_path / "run").mkdir()
    flat(100).save(tmp_path / "run" / "plain.png")
    mask = Image.new("L", (16, 16), 0)
    mask.paste(255, (0, 0, 12, 16))  # the edge inside a JPEG block
    mask.save(tmp_path / "run" / "mask.png")
    edited = np.asarray(flat(100)).copy()
    edited[:, :12] = np.random.default_rng(5).integers(0, 256, (16, 12, 3))  # kept exactly
    record = output_record({"id": "masked", "t0": 0.5, "image": Image.fromarray(edited),
                            "guide": "plain.png", "mask": "mask.png"})
    record |= {"image": encode_image(edited.tobytes(), 16, 16, image_format),
               "image_format": image_format}
    write_output(tmp_path / "out", [], summary={"manifest": str(tmp_path / "run" / "m.parquet")})
    pq.write_table(pa.Table.from_pylist([record]), tmp_path / "out" / "data" / "part-0.parquet")
    report = evaluate(OutputFolder(str(tmp_path / "out")))
    (group,) = report["by_t0"]
    assert group["image_formats"] == [image_format] and group["masked_outputs"] == 1
    assert group["lossless"] == (image_format != "jpeg")
    assert (group["max_change_outside_mask"] > 0) == (image_format == "jpeg")  # still reported
    assert report["exact_keep_outside_mask"] is exact
    assert f"guide kept exactly outside every mask: {verdict}" in format_report(report)


def spoil_image(shard, row_id: str) -> None:
    """Replace the encoded image of `row_id`'s rows in a Parquet shard with bytes of no image."""
    rows = pq.read_table(shard).to_pylist()
    for row in rows:
        if row["id"] == row_id:
            row["image"] = b"not an image"
    pq.write_table(pa.Table.from_pylist(rows), shard)


def test_a_manifest_that_does_not_exist_is_refused(known_output, tmp_path):
    """It was taken as any folder: 0 outputs scored, and a hint to pass --manifest."""
    missing = tmp_path / "nope.parquet"
    result = CliRunner().invoke(evaluate_command, [str(known_output), "--manifest", str(missing)])
    assert result.exit_code == 2, result.output
    assert result.output.splitlines()[-1] == (
        f"Error: Invalid value for --manifest: manifest {missing} does not exist")
    assert not (known_output / "evaluation.json").exists()


@pytest.mark.parametrize(("name", "reason"), [
    ("part-1.parquet", "Parquet file (cut short or damaged?): ArrowInvalid: Parquet magic bytes "
     "not found in footer. Either the file is corrupted or this is not a parquet file."),
    ("part-0.tar", "WebDataset (tar) file (cut short or damaged?): ReadError: invalid header"),
])
def test_an_unreadable_shard_is_named(tmp_path, name, reason):
    """The error said what Arrow or tarfile found, not in which shard."""
    output = write_output(tmp_path / "out", [{"id": "a", "t0": 0.5, "image": flat(1)},
                                             {"id": "b", "t0": 0.5, "image": flat(2)}])
    shard = output / "data" / name
    if name.endswith(".parquet"):
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # cut short
    else:  # a WebDataset OUTPUT whose one shard is no tar file
        for parquet in output.glob("data/*.parquet"):
            parquet.unlink()
        shard.write_bytes(b"not a tar file" * 40)
    result = CliRunner().invoke(evaluate_command, [str(output)])
    assert result.exit_code == 1, result.output
    assert result.output == f"Error: shard {shard} is not a readable {reason}\n"


def test_an_output_image_that_cannot_be_decoded_is_named(known_output):
    """The error named a BytesIO object, not the row."""
    spoil_image(known_output / "data" / "part-0.parquet", "large")
    result = CliRunner().invoke(evaluate_command, [str(known_output)])
    assert result.exit_code == 1, result.output
    assert result.output == (
        f"Error: output id 'large', t0 0.3, sample 0 in {known_output}/data/part-0.parquet: its "
        "image cannot be decoded: not an image Pillow can identify\n")
    assert not (known_output / "evaluation.json").exists()


def test_outputs_whose_guide_changed_since_the_run_are_counted_and_named(tmp_path):
    """`sdedit guides` rerun into its folder with other settings replaced the guides; evaluate
    then scored the old outputs against the new guides without a word (0.95 against 0.90)."""
    (tmp_path / "run").mkdir()
    flat(100).save(tmp_path / "run" / "a.png")
    flat(60).save(tmp_path / "run" / "b.png")
    outputs = [{"id": name, "t0": 0.5, "image": flat(120), "guide": f"{name}.png",
                "l2_to_guide": (20 * UNIT if name == "a" else 60 * UNIT) ** 2}
               for name in ("a", "b")]
    summary = {"config": {"manifest": str(tmp_path / "run" / "m.parquet")}}
    folder = OutputFolder(str(write_output(tmp_path / "out", outputs, summary=summary)))
    assert evaluate(folder)["outputs_unlike_their_guide"] == 0
    flat(90).save(tmp_path / "run" / "a.png")  # a guide made again, differently
    _decoded.cache_clear()  # as a new process: guides are read once per process
    report = evaluate(folder)
    assert report["outputs_unlike_their_guide"] == 1
    assert ("1 lossless outputs recorded an l2_to_guide more than 1% from the L2 to their guide "
            "as read now") in format_report(report)
    summary["config"]["fast_decode"] = True  # its guides differ from a full decode by design
    (tmp_path / "out" / "summary.json").write_text(json.dumps(summary))
    assert evaluate(folder)["outputs_unlike_their_guide"] is None
