"""`sdedit train` end to end on tiny PNG folders, globs and manifests."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path

import click
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import load_file, save_file

import sdedit
from pipeline.cli import main
from pipeline.train_cli import decode_image, image_uris
from tasks.images import open_image, to_rgb

SMALL = ["--resolution", "32", "--channels", "16,32", "--batch-size", "2", "--threads", "1"]


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def pngs(tmp_path):
    """Six 48x48 RGBA emoji-like PNGs: a coloured disc on a transparent background."""
    folder = tmp_path / "pngs"
    folder.mkdir()
    yy, xx = np.mgrid[:48, :48]
    disc = (yy - 24) ** 2 + (xx - 24) ** 2 < 16**2
    for index, colour in enumerate([(255, 200, 0), (200, 30, 30), (30, 120, 220)] * 2):
        pixels = np.zeros((48, 48, 4), np.uint8)
        pixels[disc] = (*colour, 255)
        Image.fromarray(pixels, "RGBA").save(folder / f"emoji{index}.png")
    return folder


def _train(*args: str):
    result = CliRunner().invoke(main, ["train", *map(str, args)], catch_exceptions=False)
    return result


def test_train_writes_a_prior_that_loads_and_edits(pngs, tmp_path):
    out = tmp_path / "prior"
    result = _train(pngs, out, "--steps", "4", "--log-every", "2", *SMALL)
    assert result.exit_code == 0, result.output
    assert "6 images at 32px" in result.output
    assert "step 2/4" in result.output and "step 4/4" in result.output and "loss" in result.output
    prior = sdedit.load(out, device="cpu")
    assert (prior.resolution, prior.channels) == (32, 3)
    guide = torch.zeros(1, 3, 32, 32)
    edited = prior.edit(guide, t0=0.3, steps=3, generator=sdedit.generators([0]))
    assert edited.shape == guide.shape and bool(torch.isfinite(edited).all())
    meta = json.loads((out / "checkpoint" / "state.json").read_text())
    assert meta["step"] == 4 and len(meta["losses"]) == 4


def test_resume_continues_to_the_same_weights(pngs, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert _train(pngs, straight, "--steps", "4", *SMALL).exit_code == 0
    assert _train(pngs, split, "--steps", "2", *SMALL).exit_code == 0
    resumed = _train(pngs, split, "--steps", "4", *SMALL)
    assert "resuming" in resumed.output and "from step 2" in resumed.output
    expected = load_file(str(straight / "diffusion_pytorch_model.safetensors"))
    actual = load_file(str(split / "diffusion_pytorch_model.safetensors"))
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[name], actual[name]) for name in expected)


def test_time_limit_stops_early_and_the_rerun_finishes_the_same_weights(pngs, tmp_path):
    straight, limited = tmp_path / "straight", tmp_path / "limited"
    assert _train(pngs, straight, "--steps", "4", *SMALL).exit_code == 0
    stopped = _train(pngs, limited, "--steps", "4", "--log-every", "2", "--time-limit", "1e-6",
                     *SMALL)
    assert stopped.exit_code == 0, stopped.output
    assert "at step 1 (time limit reached" in stopped.output and "step 2/4" not in stopped.output
    meta = json.loads((limited / "checkpoint" / "state.json").read_text())
    assert meta["step"] == 1 and len(meta["losses"]) == 1
    finished = _train(pngs, limited, "--steps", "4", *SMALL)
    assert "from step 1" in finished.output and "saved" in finished.output
    expected = load_file(str(straight / "diffusion_pytorch_model.safetensors"))
    actual = load_file(str(limited / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(expected[name], actual[name]) for name in expected)


def test_resume_refuses_conflicting_settings(pngs, tmp_path):
    out = tmp_path / "prior"
    assert _train(pngs, out, "--steps", "1", *SMALL).exit_code == 0
    result = CliRunner().invoke(main, ["train", str(pngs), str(out), "--steps", "2",
                                       "--resolution", "32", "--channels", "16,32,32",
                                       "--batch-size", "2"])
    assert result.exit_code == 2
    assert "--channels" in result.output and "other settings" in result.output


def test_a_unet_without_attention_is_noted(pngs, tmp_path):
    """Attention goes where the feature map is 8x8: at --resolution 64 the default three
    widths (64, 32, 16 pixels) give none, which the help and the run now say."""
    help_text = " ".join(CliRunner().invoke(main, ["train", "--help"]).output.split())
    assert "none at --resolution 64 with three widths" in help_text
    result = _train(pngs, tmp_path / "p64", "--steps", "1", "--resolution", "64",
                    "--channels", "8,16,16", "--batch-size", "1", "--threads", "1")
    assert result.exit_code == 0, result.output
    assert "note: no level of this UNet is 8x8 pixels (64px with 3 widths)" in result.stderr
    with_attention = _train(pngs, tmp_path / "p32", "--steps", "1", "--resolution", "32",
                            "--channels", "8,16,16", "--batch-size", "1", "--threads", "1")
    assert with_attention.exit_code == 0 and "no attention" not in with_attention.stderr


def test_a_checkpoint_it_cannot_resume_from_is_one_clear_error(pngs, tmp_path):
    out = tmp_path / "prior"
    assert _train(pngs, out, "--steps", "1", *SMALL).exit_code == 0
    tensors = load_file(str(out / "checkpoint" / "state.safetensors"))
    save_file(tensors, str(out / "checkpoint" / "state.safetensors"))  # as earlier releases
    (out / "checkpoint" / "state.json").unlink()  # killed before renaming it into place
    result = CliRunner().invoke(main, ["train", str(pngs), str(out), "--steps", "2", *SMALL])
    assert result.exit_code == 1 and result.output.startswith("Error: checkpoint ")
    assert "remove the folder" in result.output


def test_manifest_and_glob_sources(pngs, tmp_path):
    manifest = pngs / "manifest.parquet"
    pq.write_table(pa.table({"id": ["a", "b"], "image": ["emoji0.png", "emoji1.png"]}), manifest)
    assert image_uris(str(manifest)) == [f"{pngs}/emoji0.png", f"{pngs}/emoji1.png"]
    assert len(image_uris(f"{pngs}/emoji[0-2].png")) == 3
    assert len(image_uris(f"file://{pngs}")) == 6


def test_a_guides_manifest_trains_on_its_photos_not_its_stroke_paintings(pngs):
    """`sdedit guides` writes `source` (the photos) beside `guide` (paintings made from them),
    as the bundled example does; `sdedit manifest` writes `source` alone."""
    both = pngs / "guides.parquet"
    pq.write_table(pa.table({"id": ["a", "b"], "guide": ["guides/a.png", "guides/b.png"],
                             "source": ["emoji2.png", "emoji3.png"]}), both)
    assert image_uris(str(both)) == [f"{pngs}/emoji2.png", f"{pngs}/emoji3.png"]
    photos = pngs / "photos.parquet"
    pq.write_table(pa.table({"id": ["c"], "source": [f"{pngs}/emoji4.png"]}), photos)
    assert image_uris(str(photos)) == [f"{pngs}/emoji4.png"]


def test_bad_sources_are_named(tmp_path):
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(main, ["train", str(tmp_path / "empty"), str(tmp_path / "out")])
    assert result.exit_code == 2 and "no images" in result.output
    pq.write_table(pa.table({"path": ["x.png"]}), tmp_path / "m.parquet")
    result = CliRunner().invoke(main, ["train", str(tmp_path / "m.parquet"), str(tmp_path / "o")])
    assert result.exit_code == 2 and "no image, source or guide column" in result.output


def test_transparency_is_composited_on_white():
    pixels = np.zeros((8, 8, 4), np.uint8)
    pixels[2:6, 2:6] = (0, 0, 255, 255)
    buffer = _png_bytes(Image.fromarray(pixels, "RGBA"))
    decoded = decode_image(buffer, 8)
    assert decoded.shape == (8, 8, 3)
    assert decoded[0, 0].tolist() == [255, 255, 255]
    assert decoded[3, 3].tolist() == [0, 0, 255]


def test_sixteen_bit_grayscale_is_scaled_not_clipped():
    deep = np.array([[0, 65535], [32896, 255]], dtype=np.uint16)  # opens as "I;16"
    decoded = decode_image(_png_bytes(Image.fromarray(deep)), 2)
    expected = np.array([[0, 255], [128, 1]], dtype=np.uint8)  # value / 257, as in sdedit run
    assert np.array_equal(decoded, np.dstack([expected] * 3))


def test_palette_transparency_is_composited_on_white():
    palette = Image.new("P", (2, 2), 0)
    palette.putpalette([200, 0, 0, 0, 0, 255])  # index 0 red (transparent), 1 blue
    palette.putpixel((1, 1), 1)
    decoded = decode_image(_png_bytes(palette, transparency=0), 2)
    assert decoded[0, 0].tolist() == [255, 255, 255] and decoded[1, 1].tolist() == [0, 0, 255]


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "1", "P", "I;16"])
def test_decodes_exactly_as_the_pipeline(mode):
    rgb = Image.fromarray(np.random.default_rng(8).integers(0, 256, (6, 6, 3), dtype=np.uint8))
    deep = Image.fromarray(np.arange(36, dtype=np.uint16).reshape(6, 6) * 1800)
    image = deep if mode == "I;16" else rgb.convert(mode)
    payload = _png_bytes(image, **({"transparency": 3} if mode == "P" else {}))
    expected = np.asarray(to_rgb(open_image(payload, "x.png", 10_000), "x.png"))
    assert np.array_equal(decode_image(payload, 6, "x.png"), expected)


def test_float_image_is_rejected_naming_the_uri():
    stream = io.BytesIO()
    Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32)).save(stream, format="TIFF")
    with pytest.raises(click.ClickException) as error:
        decode_image(stream.getvalue(), 4, "s3://bucket/float.tif")
    assert error.value.message.startswith("s3://bucket/float.tif has unsupported image mode 'F'")


def test_oversized_and_broken_images_are_named():
    big = _png_bytes(Image.new("RGB", (20, 10)))
    with pytest.raises(click.ClickException, match="big.png is 20x10 = 200 pixels, over the "
                                                   "limit of 199"):
        decode_image(big, 4, "big.png", max_pixels=199)
    with pytest.raises(click.ClickException, match="cannot decode cut.png as an image"):
        decode_image(big[: len(big) // 2], 4, "cut.png")


def test_train_stops_on_an_undecodable_image_in_a_manifest(pngs, tmp_path):
    Image.fromarray(np.zeros((4, 4), dtype=np.float32)).save(pngs / "float.tif")
    manifest = pngs / "manifest.parquet"
    pq.write_table(pa.table({"image": ["emoji0.png", "float.tif"]}), manifest)
    result = _train(manifest, tmp_path / "prior", "--steps", "1", *SMALL)
    assert result.exit_code == 1
    assert f"{pngs}/float.tif has unsupported image mode 'F'" in result.output


def test_a_bucket_output_model_is_refused_before_any_work(pngs, tmp_path, monkeypatch):
    """Training wrote s3://bucket/p1 to a local folder named `s3:` and said it saved to S3."""
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["train", str(pngs), "s3://bucket/priors/p1", "--steps",
                                       "1", *SMALL])
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())
    assert "s3://bucket/priors/p1 is not a local folder" in message
    assert "copy that folder to the bucket" in message
    assert "sdedit run --model s3://bucket/priors/p1" in message
    assert sorted(path.name for path in tmp_path.iterdir()) == ["pngs"]  # no ./s3:/ folder


def test_a_file_uri_output_model_is_the_local_folder(pngs, tmp_path):
    result = _train(pngs, f"file://{tmp_path / 'prior'}", "--steps", "1", *SMALL)
    assert result.exit_code == 0, result.output
    assert f"saved {tmp_path / 'prior'} at step 1" in result.output
    assert (tmp_path / "prior" / "checkpoint" / "state.safetensors").is_file()


def test_a_model_without_a_checkpoint_is_not_overwritten(pngs, tmp_path):
    """The bundled prior has no checkpoint/: a fresh run there replaced its weights."""
    shipped = tmp_path / "default"
    shutil.copytree(Path(sdedit.__file__).parent / "priors" / "default", shipped)
    weights = shipped / "diffusion_pytorch_model.safetensors"
    before = hashlib.sha256(weights.read_bytes()).hexdigest()
    result = CliRunner().invoke(main, ["train", str(pngs), str(shipped), "--steps", "1", *SMALL])
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())
    assert (f"{shipped} already holds a model (config.json, diffusion_pytorch_model.safetensors)"
            " but no checkpoint/ to resume from") in message
    assert "choose a new OUTPUT_MODEL, or delete" in message
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == before
    assert not (shipped / "checkpoint").exists()


def _binary_image_shard(folder: Path) -> Path:
    """A shard as `sdedit run` writes it: the `image` column holds PNG bytes."""
    from pipeline.writers import DATA_TYPES

    row = {"id": "a", "t0": 0.5, "sample": 0, "image": _png_bytes(Image.new("RGB", (4, 4))),
           "image_format": "png", "guide": "emoji0.png"}
    schema = pa.schema([*DATA_TYPES.items(), ("guide", pa.string())])
    pq.write_table(pa.Table.from_pylist([row], schema), folder / "part-0.parquet")
    return folder / "part-0.parquet"


@pytest.mark.parametrize("case", ["empty manifest", "missing image", "output shard", "cuda"])
def test_input_errors_are_one_clear_line(case, pngs, tmp_path):
    """Each of these ended in a Python traceback; now one `Error:` line names the URI."""
    if case == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    images, device, expected = str(pngs), [], ""
    if case == "empty manifest":
        images = str(tmp_path / "empty.parquet")
        pq.write_table(pa.table({"image": pa.array([], pa.string())}), images)
        expected = f"manifest {images} names no images: its 'image' column has no URI in 0 row"
    elif case == "missing image":
        images = str(pngs / "manifest.parquet")
        pq.write_table(pa.table({"image": ["emoji0.png", "gone.png"]}), images)
        expected = f"Error: cannot read {pngs}/gone.png: FileNotFoundError"
    elif case == "output shard":
        images = str(_binary_image_shard(tmp_path))
        expected = (f"manifest {images}: column 'image' holds binary, expected image URIs "
                    "(strings) (an `sdedit run` output shard?")
    else:
        device = ["--device", "cuda"]
        expected = "Invalid value for '--device': cuda: torch"
    result = _train(images, tmp_path / "prior", "--steps", "1", *device, *SMALL)
    assert result.exit_code in (1, 2), result.output
    assert expected in " ".join(result.output.split())
    assert "Traceback" not in result.output and not (tmp_path / "prior").exists()


@pytest.mark.slow
def test_images_in_a_bucket_are_read_with_the_storage_options(s3_server, tmp_path):
    """IMAGES may be a bucket URI; its endpoint comes from --storage-option, as for the other
    commands (the credentials are in the environment, the endpoint is not)."""
    import s3fs

    fs = s3fs.S3FileSystem(**s3_server.storage_options, skip_instance_cache=True)
    bucket = s3_server.new_bucket().removeprefix("s3://")
    for index, colour in enumerate([(255, 200, 0), (30, 120, 220), (200, 30, 30)]):
        fs.pipe(f"{bucket}/photos/{index}.png", _png_bytes(Image.new("RGB", (40, 40), colour)))
    manifest = io.BytesIO()
    pq.write_table(pa.table({"image": ["photos/0.png", "photos/1.png"]}), manifest)
    fs.pipe(f"{bucket}/train.parquet", manifest.getvalue())
    flags = ["--storage-option", f"endpoint_url={s3_server.endpoint_url}"]
    for source, count in ((f"s3://{bucket}/photos", 3), (f"s3://{bucket}/train.parquet", 2)):
        out = tmp_path / source.rsplit("/", 1)[1]
        result = _train(source, out, "--steps", "1", *flags, *SMALL)
        assert result.exit_code == 0, result.output
        assert f"{count} images at 32px" in result.output
        assert (out / "diffusion_pytorch_model.safetensors").is_file()


def _png_bytes(image: Image.Image, **options) -> bytes:
    stream = io.BytesIO()
    image.save(stream, format="PNG", **options)
    return stream.getvalue()


def test_an_output_model_it_cannot_write_is_refused_before_training(pngs, tmp_path):
    """OUTPUT_MODEL under a file was found only at the first save, after --save-every steps."""
    (tmp_path / "file").write_bytes(b"not a folder")
    result = _train(pngs, tmp_path / "file" / "prior", "--steps", "2", *SMALL)
    assert result.exit_code == 2, result.output
    assert f"cannot write the model to {tmp_path / 'file' / 'prior'}" in result.output
    assert "images at 32px" not in result.output  # nothing read, nothing trained


@pytest.mark.parametrize(("option", "value"), [("--lr", "nan"), ("--lr", "inf"),
                                               ("--time-limit", "nan")])
def test_a_learning_rate_or_time_limit_that_is_not_finite_is_refused(pngs, tmp_path, option,
                                                                      value):
    result = _train(pngs, tmp_path / "prior", "--steps", "2", option, value, *SMALL)
    assert result.exit_code == 2, result.output
    assert f"Invalid value for '{option}': must be a finite number, got {value}" in result.output


def test_training_that_diverges_stops_without_saving(pngs, tmp_path):
    """--lr 1e9 made every weight NaN; the run saved them and exited 0, and `sdedit edit` with
    that prior wrote black images."""
    out = tmp_path / "prior"
    result = _train(pngs, out, "--steps", "6", "--log-every", "2", "--lr", "1e9", *SMALL)
    assert result.exit_code == 1, result.output
    assert "training diverged: loss nan by step" in result.output
    assert not (out / "diffusion_pytorch_model.safetensors").exists()
