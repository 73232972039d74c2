"""`sdedit edit`: one guide image in, one PNG out, through the real click group and models."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from pipeline.cli import main
from pipeline.edit_cli import (
    image_to_tensor,
    mask_to_tensor,
    read_image,
    read_mask,
    tensor_to_image,
)
from pipeline.fetch import load_guide, load_mask

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write_png(path, pixels: np.ndarray):
    Image.fromarray(pixels).save(path)
    return path


def noise_pixels(height: int, width: int, seed: int = 0, channels: int = 3) -> np.ndarray:
    shape = (height, width, channels) if channels > 1 else (height, width)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def box_mask(height: int, width: int) -> np.ndarray:
    """White (synthesize) in a central box, black (keep) elsewhere."""
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[height // 4: 3 * height // 4, width // 4: 3 * width // 4] = 255
    return mask


def sdedit_edit(*arguments: str):
    """Invoke `sdedit edit ARGUMENTS` through the real click group."""
    return CliRunner().invoke(main, ["edit", *arguments])


def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image)


# --- the command end to end ----------------------------------------------------------------


@pytest.fixture
def small_guide(tmp_path):
    """A 40x48 (width x height) RGB guide, not the model's 64x64, and a box mask."""
    guide = write_png(tmp_path / "g.png", noise_pixels(48, 40))
    mask = write_png(tmp_path / "m.png", box_mask(48, 40))
    return guide, mask


def test_writes_a_png_of_the_guides_size(tmp_path, small_guide):
    guide, mask = small_guide
    out = tmp_path / "o.png"
    result = sdedit_edit("--model", "builtin:tiny", "--guide", str(guide), "--mask", str(mask),
                         "--t0", "0.5", "--steps", "3", "--seed", "1", "--out", str(out))
    assert result.exit_code == 0, result.output
    with Image.open(out) as image:
        assert (image.format, image.mode, image.size) == ("PNG", "RGB", (40, 48))
    assert "resizing guide from 40x48 to the model's resolution 64x64" in result.stderr
    kept = box_mask(48, 40) == 0
    assert np.array_equal(pixels(out)[kept], pixels(guide)[kept])  # kept region is exact
    changed = np.abs(pixels(out)[~kept].astype(int) - pixels(guide)[~kept]).mean()
    assert changed > 10  # the box was resynthesized (by a random-weight model: noise)


def test_a_webp_output_keeps_the_guide_exactly_as_the_pipeline_writes_webp(tmp_path,
                                                                          small_guide):
    """Pillow's own WebP is lossy: the kept region changed by up to 73 grey levels."""
    guide, mask = small_guide
    out = tmp_path / "o.webp"
    result = sdedit_edit("--model", "builtin:tiny", "--guide", str(guide), "--mask", str(mask),
                         "--t0", "0.5", "--steps", "3", "--out", str(out))
    assert result.exit_code == 0, result.output
    kept = box_mask(48, 40) == 0
    assert Image.open(out).format == "WEBP"
    assert np.array_equal(pixels(out)[kept], pixels(guide)[kept])


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path, small_guide):
    guide, mask = small_guide
    outputs = {}
    for name, seed in [("a", "1"), ("b", "1"), ("c", "2")]:
        outputs[name] = tmp_path / f"{name}.png"
        result = sdedit_edit("--model", "builtin:tiny", "--guide", str(guide), "--mask",
                             str(mask), "--t0", "0.5", "--steps", "3", "--seed", seed,
                             "--out", str(outputs[name]))
        assert result.exit_code == 0, result.output
    assert outputs["a"].read_bytes() == outputs["b"].read_bytes()
    assert outputs["a"].read_bytes() != outputs["c"].read_bytes()


def test_black_mask_keeps_the_guide_exactly(tmp_path):
    guide = write_png(tmp_path / "g.png", noise_pixels(64, 64, seed=3))
    black = write_png(tmp_path / "black.png", np.zeros((64, 64), dtype=np.uint8))
    out = tmp_path / "o.png"
    result = sdedit_edit("--model", "builtin:tiny", "--guide", str(guide), "--mask", str(black),
                         "--t0", "0.8", "--steps", "3", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "resizing" not in result.stderr  # already at the model's resolution
    assert np.array_equal(pixels(out), pixels(guide))
    assert (f"mask {black} marks nothing to synthesize at the model's 64x64 (white marks it; "
            "--mask-mode binary counts a pixel from 50% grey): the output is the guide "
            "unchanged") in result.stderr
    faint = write_png(tmp_path / "faint.png", np.full((64, 64), 100, dtype=np.uint8))
    for mode, noted in (("binary", True), ("soft", False)):  # 100/255 is synthesized in part
        result = sdedit_edit("--model", "builtin:tiny", "--guide", str(guide), "--mask",
                             str(faint), "--mask-mode", mode, "--steps", "3", "--out", str(out))
        assert result.exit_code == 0 and ("marks nothing" in result.stderr) == noted, mode


def test_without_a_mask_everything_changes(tmp_path):
    guide = write_png(tmp_path / "g.png", noise_pixels(64, 64, seed=4))
    out = tmp_path / "o.png"
    result = sdedit_edit("--model", "builtin:tiny", "--guide", str(guide), "--t0", "0.3",
                         "--steps", "2", "--repeats", "2", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert (pixels(out) != pixels(guide)).mean() > 0.9


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_grayscale_transparent_and_palette_guides(tmp_path, mode):
    rgb = Image.fromarray(noise_pixels(64, 64, seed=5))
    image = {"L": rgb.convert("L"), "RGBA": rgb.convert("RGBA"), "P": rgb.convert("P")}[mode]
    guide = tmp_path / "g.png"
    image.save(guide)
    out = tmp_path / "o.png"
    result = sdedit_edit("--model", "builtin:tiny", "--guide", str(guide), "--steps", "2",
                         "--out", str(out))
    assert result.exit_code == 0, result.output
    with Image.open(out) as written:
        assert (written.mode, written.size) == ("RGB", (64, 64))


# --- a model saved with diffusers' save_pretrained -----------------------------------------


@pytest.fixture
def saved_model(tmp_path):
    from diffusers import DDPMScheduler, UNet2DModel

    with torch.random.fork_rng():
        torch.manual_seed(0)
        unet = UNet2DModel(sample_size=32, layers_per_block=1, block_out_channels=(8, 16),
                           norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
                           up_block_types=("UpBlock2D", "UpBlock2D"))
    folder = tmp_path / "model"
    unet.save_pretrained(folder)
    DDPMScheduler().save_pretrained(folder)
    return folder


def test_saved_model_runs_by_path_and_file_uri(tmp_path, saved_model):
    guide = write_png(tmp_path / "g.png", noise_pixels(32, 32, seed=6))
    mask = write_png(tmp_path / "m.png", box_mask(32, 32))
    outputs = []
    for model in (str(saved_model), f"file://{saved_model}"):
        outputs.append(tmp_path / f"o{len(outputs)}.png")
        result = sdedit_edit("--model", model, "--guide", str(guide), "--mask", str(mask),
                             "--t0", "0.4", "--steps", "3", "--seed", "9",
                             "--out", str(outputs[-1]))
        assert result.exit_code == 0, result.output
        assert "resizing" not in result.stderr  # the model's resolution is 32
    assert outputs[0].read_bytes() == outputs[1].read_bytes()
    kept = box_mask(32, 32) == 0
    assert np.array_equal(pixels(outputs[0])[kept], pixels(guide)[kept])
    assert not np.array_equal(pixels(outputs[0]), pixels(guide))


def test_pickle_model_needs_allow_pickle(tmp_path, saved_model):
    from diffusers import UNet2DModel

    UNet2DModel.from_pretrained(saved_model).save_pretrained(saved_model, safe_serialization=False)
    (saved_model / "diffusion_pytorch_model.safetensors").unlink()
    guide = write_png(tmp_path / "g.png", noise_pixels(32, 32))
    arguments = ["--model", str(saved_model), "--guide", str(guide), "--steps", "2",
                 "--out", str(tmp_path / "o.png")]
    refused = sdedit_edit(*arguments)
    assert refused.exit_code == 1 and "--allow-pickle" in refused.output
    assert sdedit_edit(*arguments, "--allow-pickle").exit_code == 0


# --- errors --------------------------------------------------------------------------------


@pytest.mark.parametrize("t0", ["0", "-0.1", "1.5", "nan"])
def test_bad_t0(tmp_path, t0):
    guide = write_png(tmp_path / "g.png", noise_pixels(8, 8))
    result = sdedit_edit("--model", "builtin:tiny", "--guide", str(guide), "--t0", t0,
                         "--out", str(tmp_path / "o.png"))
    assert result.exit_code == 2
    assert "Invalid value for '--t0'" in result.output and "(0, 1]" in result.output


@pytest.mark.parametrize(("option", "value"), [("--steps", "0"), ("--repeats", "0")])
def test_bad_steps_and_repeats(tmp_path, option, value):
    guide = write_png(tmp_path / "g.png", noise_pixels(8, 8))
    result = sdedit_edit("--model", "builtin:tiny", "--guide", str(guide), option, value,
                         "--out", str(tmp_path / "o.png"))
    assert result.exit_code == 2 and f"Invalid value for '{option}'" in result.output


def test_a_device_or_seed_torch_cannot_use_is_a_usage_error(tmp_path):
    """Each was a torch traceback (RuntimeError, AssertionError, an overflow), the device's
    only after the guide was read."""
    import torch

    guide = write_png(tmp_path / "g.png", noise_pixels(8, 8))
    missing_gpu = f"cuda:{torch.cuda.device_count()}"  # one past the last GPU, or none at all
    for option, value, says in [("--device", "foo", "unknown torch device 'foo'"),
                                ("--device", missing_gpu, missing_gpu + ": "),
                                ("--device", "meta", "sees no meta device"),
                                ("--seed", str(2**64), "is not in the range")]:
        result = sdedit_edit("--model", "builtin:tiny", "--guide", str(guide), option, value,
                             "--out", str(tmp_path / "o.png"))
        assert result.exit_code == 2, result.output
        assert f"Invalid value for '{option}'" in result.output and says in result.output
        assert not (tmp_path / "o.png").exists()


def test_mask_of_another_size(tmp_path):
    guide = write_png(tmp_path / "g.png", noise_pixels(64, 64))
    mask = write_png(tmp_path / "m.png", box_mask(48, 40))
    out = tmp_path / "o.png"
    result = sdedit_edit("--model", "builtin:tiny", "--guide", str(guide), "--mask", str(mask),
                         "--out", str(out))
    assert result.exit_code == 2
    assert "mask" in result.output and "40x48" in result.output and "64x64" in result.output
    assert not out.exists()


def test_missing_guide_and_mask_files(tmp_path):
    guide = write_png(tmp_path / "g.png", noise_pixels(8, 8))
    missing = sdedit_edit("--model", "builtin:tiny", "--guide", str(tmp_path / "nope.png"),
                          "--out", str(tmp_path / "o.png"))
    assert missing.exit_code == 2 and "nope.png" in missing.output
    assert "does not exist" in missing.output
    no_mask = sdedit_edit("--model", "builtin:tiny", "--guide", str(guide), "--mask",
                          str(tmp_path / "m.png"), "--out", str(tmp_path / "o.png"))
    assert no_mask.exit_code == 2 and "'--mask'" in no_mask.output


def test_guide_that_is_not_an_image(tmp_path):
    guide = tmp_path / "g.png"
    guide.write_text("not a png")
    result = sdedit_edit("--model", "builtin:tiny", "--guide", str(guide),
                         "--out", str(tmp_path / "o.png"))
    assert result.exit_code == 2 and "cannot decode" in result.output


def write_float_tiff(path):
    """A 32-bit float ("F") image, which `sdedit run` rejects."""
    Image.fromarray(np.full((8, 8), 0.5, dtype=np.float32)).save(path)
    return path


def test_float_guide_is_rejected_like_the_pipeline(tmp_path):
    guide = write_float_tiff(tmp_path / "float.tif")
    out = tmp_path / "o.png"
    result = sdedit_edit("--model", "builtin:tiny", "--guide", str(guide), "--out", str(out))
    assert result.exit_code == 2 and "Invalid value for '--guide'" in result.output
    assert str(guide) in result.output and "unsupported image mode 'F'" in result.output
    assert "expected RGB, grayscale, palette, 16-bit" in result.output
    assert not out.exists()


def test_float_mask_is_rejected_like_the_pipeline(tmp_path):
    guide = write_png(tmp_path / "g.png", noise_pixels(8, 8))
    mask = write_float_tiff(tmp_path / "float.tif")
    result = sdedit_edit("--model", "builtin:tiny", "--guide", str(guide), "--mask", str(mask),
                         "--out", str(tmp_path / "o.png"))
    assert result.exit_code == 2 and "Invalid value for '--mask'" in result.output
    assert f"mask {mask} has unsupported mode 'F'" in result.output


def test_guide_over_max_pixels_is_refused(tmp_path):
    guide = write_png(tmp_path / "g.png", noise_pixels(10, 20))
    result = sdedit_edit("--model", "builtin:tiny", "--guide", str(guide), "--max-pixels", "199",
                         "--out", str(tmp_path / "o.png"))
    assert result.exit_code == 2 and "Invalid value for '--guide'" in result.output
    assert "20x10 = 200 pixels, over the limit of 199" in result.output


def test_missing_model_folder(tmp_path):
    guide = write_png(tmp_path / "g.png", noise_pixels(8, 8))
    result = sdedit_edit("--model", str(tmp_path / "no-model"), "--guide", str(guide),
                         "--out", str(tmp_path / "o.png"))
    assert result.exit_code == 1
    assert "cannot load model" in result.output and "does not exist" in result.output


def test_unknown_output_extension(tmp_path):
    guide = write_png(tmp_path / "g.png", noise_pixels(8, 8))
    result = sdedit_edit("--model", "builtin:tiny", "--guide", str(guide),
                         "--out", str(tmp_path / "o.unknown"))
    assert result.exit_code == 2 and "Invalid value for '--out'" in result.output


@pytest.mark.parametrize("suffix", [".psd", ".xpm", ".pcd", ".h5"])
def test_an_output_format_pillow_cannot_write_is_refused_before_editing(tmp_path, suffix):
    """Pillow reads these (or knows their extension) but cannot write them: the edit ran, then
    `image.save` failed with a KeyError traceback."""
    guide = write_png(tmp_path / "g.png", noise_pixels(8, 8))
    result = sdedit_edit("--model", str(tmp_path / "no-model"), "--guide", str(guide),
                         "--out", str(tmp_path / f"o{suffix}"))
    assert result.exit_code == 2, result.output
    assert "Invalid value for '--out'" in result.output and "cannot write" in result.output
    assert not (tmp_path / f"o{suffix}").exists()


def test_a_soft_mask_is_applied_once_at_any_guide_size(tmp_path):
    """A uniform 50% soft mask on a black guide: at twice the model's resolution the output is
    the model-resolution output resized, not blended with the guide a second time."""
    outputs = {}
    for side in (64, 128):
        guide = write_png(tmp_path / f"black{side}.png", np.zeros((side, side, 3), np.uint8))
        grey = write_png(tmp_path / f"grey{side}.png", np.full((side, side), 128, np.uint8))
        outputs[side] = tmp_path / f"soft{side}.png"
        result = sdedit_edit("--model", "builtin:tiny", "--guide", str(guide), "--mask",
                             str(grey), "--mask-mode", "soft", "--t0", "0.5", "--steps", "5",
                             "--seed", "3", "--out", str(outputs[side]))
        assert result.exit_code == 0, result.output
    with Image.open(outputs[64]) as small:
        expected = np.asarray(small.resize((128, 128), Image.Resampling.LANCZOS))
    assert pixels(outputs[64]).mean() > 5  # the edit moved away from the black guide
    assert np.array_equal(pixels(outputs[128]), expected)


def test_a_feathered_soft_mask_leaves_no_seam_at_a_larger_guide_size(tmp_path):
    """Pasting the full-size guide only where the mask is 0 made the output jump from the sharp
    guide to the blurred model-resolution result at the first mask value above 0."""
    guide = write_png(tmp_path / "noise.png", noise_pixels(256, 256, seed=5))
    weights = np.zeros((256, 256), np.uint8)
    weights[:, 128:192], weights[:, 192:] = 3, 255  # keep | a faint feather | synthesize
    mask = write_png(tmp_path / "feather.png", weights)
    out = tmp_path / "out.png"
    result = sdedit_edit("--model", "builtin:tiny", "--guide", str(guide), "--mask", str(mask),
                         "--mask-mode", "soft", "--t0", "0.05", "--steps", "5", "--seed", "1",
                         "--out", str(out))
    assert result.exit_code == 0, result.output
    change = np.abs(pixels(out).astype(int) - pixels(guide).astype(int))
    assert change[:, :128].max() == 0  # kept exactly
    assert change[:, 132:188].mean() < 6  # 1% synthesized: about the guide (was 62 off)
    assert change[:, 196:].mean() > 30  # synthesized


# --- decoding and encoding -----------------------------------------------------------------


def test_uint8_round_trip_is_exact():
    image = Image.fromarray(noise_pixels(16, 16, seed=7))
    tensor = image_to_tensor(image, 16)
    assert tensor.shape == (1, 3, 16, 16) and tensor.dtype == torch.float32
    assert float(tensor.min()) >= -1 and float(tensor.max()) <= 1
    assert np.array_equal(np.asarray(tensor_to_image(tensor[0], (16, 16))), np.asarray(image))


def test_transparent_pixels_become_white(tmp_path):
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0] = 200  # red but fully transparent
    rgba[0, 0] = (10, 20, 30, 255)  # one opaque pixel
    image = read_image(write_png(tmp_path / "t.png", rgba))
    expected = np.full((4, 4, 3), 255, dtype=np.uint8)
    expected[0, 0] = (10, 20, 30)
    assert image.mode == "RGB" and np.array_equal(np.asarray(image), expected)


def test_sixteen_bit_grayscale_is_scaled_by_257(tmp_path):
    path = tmp_path / "deep.png"
    Image.fromarray(np.array([[0, 65535], [32896, 255]], dtype=np.uint16)).save(path)
    expected = np.array([[0, 255], [128, 1]], dtype=np.uint8)  # 255 / 257 rounds to 1, as in run
    with Image.open(path) as opened:
        assert opened.mode == "I;16"
    guide = read_image(path)
    assert guide.mode == "RGB" and np.array_equal(np.asarray(guide), np.dstack([expected] * 3))
    mask = read_mask(path, (2, 2))
    assert mask.mode == "L" and np.array_equal(np.asarray(mask), expected)


def test_palette_transparency_becomes_white(tmp_path):
    palette = Image.new("P", (2, 2), 0)
    palette.putpalette([200, 0, 0, 0, 0, 255])  # index 0 red (transparent), 1 blue
    palette.putpixel((1, 1), 1)
    path = tmp_path / "p.png"
    palette.save(path, transparency=0)
    pixels = np.asarray(read_image(path))
    assert pixels[0, 0].tolist() == [255, 255, 255] and pixels[1, 1].tolist() == [0, 0, 255]


def decodable_images(tmp_path) -> list:
    """One file per mode that the pipeline converts: the paths to compare decoders on."""
    rgb = Image.fromarray(noise_pixels(6, 6, seed=8))
    deep = Image.fromarray(np.arange(36, dtype=np.uint16).reshape(6, 6) * 1800)
    palette = rgb.convert("P")
    images = [(rgb.convert("L"), "l.png", {}), (rgb.convert("LA"), "la.png", {}),
              (rgb.convert("RGBA"), "rgba.png", {}), (rgb.convert("1"), "one.png", {}),
              (palette, "p.png", {"transparency": 3}), (deep, "deep.png", {}),
              (rgb.convert("CMYK"), "cmyk.jpg", {"quality": 100})]
    for image, name, options in images:
        image.save(tmp_path / name, **options)
    return [tmp_path / name for _, name, _ in images]


def test_guides_and_masks_decode_exactly_as_in_the_pipeline(tmp_path):
    for path in decodable_images(tmp_path):
        guide = np.asarray(load_guide(str(path), {}, 10_000))
        assert np.array_equal(np.asarray(read_image(path)), guide), path.name
        mask = np.asarray(load_mask(str(path), str(path), (6, 6), {}, 10_000))
        assert np.array_equal(np.asarray(read_mask(path, (6, 6))), mask), path.name


def test_binary_and_soft_masks():
    grey = Image.fromarray(np.array([[0, 64], [128, 255]], dtype=np.uint8))
    binary = mask_to_tensor(grey, 2, "binary")
    soft = mask_to_tensor(grey, 2, "soft")
    assert binary.shape == soft.shape == (1, 1, 2, 2)
    assert binary.flatten().tolist() == [0.0, 0.0, 1.0, 1.0]
    torch.testing.assert_close(soft.flatten(), torch.tensor([0, 64, 128, 255]) / 255.0)


@pytest.mark.parametrize("below", ["", "sub/"])
def test_an_output_under_a_file_is_refused_before_editing(tmp_path, below):
    """`--out z/file/a.png` with z/file a file: the edit ran, then mkdir raised a traceback."""
    guide = write_png(tmp_path / "g.png", noise_pixels(8, 8))
    (tmp_path / "file").write_bytes(b"not a folder")
    out = tmp_path / "file" / f"{below}o.png"
    result = sdedit_edit("--model", str(tmp_path / "no-model"), "--guide", str(guide),
                         "--out", str(out))
    assert result.exit_code == 2, result.output
    assert f"cannot write {out}: {tmp_path / 'file'} is a file, not a folder" in result.output


def test_a_model_with_nan_weights_is_refused(tmp_path, saved_model):
    """A prior saved from a training run that diverged: every output was black, exit 0."""
    from safetensors.torch import load_file, save_file

    weights = saved_model / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    name = sorted(tensors)[3]
    tensors[name][0] = float("nan")
    save_file(tensors, weights)
    guide = write_png(tmp_path / "g.png", noise_pixels(32, 32))
    out = tmp_path / "o.png"
    result = sdedit_edit("--model", str(saved_model), "--guide", str(guide), "--out", str(out))
    assert result.exit_code == 1, result.output
    assert (f"weights in diffusion_pytorch_model.safetensors hold NaN or infinite values "
            f"(1 tensors, e.g. {name})") in result.output
    assert not out.exists()


def test_a_masked_edit_written_as_jpeg_notes_that_the_kept_region_is_not_exact(tmp_path):
    guide = write_png(tmp_path / "g.png", noise_pixels(32, 32, seed=3))
    mask = write_png(tmp_path / "m.png", box_mask(32, 32))
    result = sdedit_edit("--model", "builtin:tiny", "--guide", str(guide), "--mask", str(mask),
                         "--steps", "2", "--out", str(tmp_path / "o.jpg"))
    assert result.exit_code == 0, result.output
    assert "note: .jpg is lossy: outside the mask the written image is near the guide" in (
        result.stderr)
    plain = sdedit_edit("--model", "builtin:tiny", "--guide", str(guide), "--steps", "2",
                        "--out", str(tmp_path / "o2.jpg"))
    assert plain.exit_code == 0 and "lossy" not in plain.stderr  # no mask, no kept region


def test_an_edit_that_overflows_to_nan_is_refused_not_written_black(tmp_path, saved_model):
    """Finite weights whose activations overflow (float16 makes this easy): NaN became 0 in
    the uint8 cast, and the black image was written with exit 0."""
    from safetensors.torch import load_file, save_file

    weights = saved_model / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    tensors["conv_in.weight"] *= 1e36  # finite, but the activations overflow float32
    save_file(tensors, weights)
    guide = write_png(tmp_path / "g.png", noise_pixels(32, 32))
    out = tmp_path / "o.png"
    result = sdedit_edit("--model", str(saved_model), "--guide", str(guide), "--steps", "2",
                         "--out", str(out))
    assert result.exit_code == 1, result.output
    assert result.output.endswith(f"Error: SDEdit gave NaN or infinite values with model "
                                  f"{saved_model}; nothing was written\n")
    assert not out.exists()


def test_run_refuses_a_prior_that_is_not_rgb_before_any_work(tmp_path, saved_model):
    """`sdedit run` decodes guides to RGB: with a 1-channel prior every actor batch raised a
    convolution RuntimeError, and the job died with its traceback."""
    from safetensors.torch import load_file, save_file

    config = json.loads((saved_model / "config.json").read_text())
    (saved_model / "config.json").write_text(json.dumps({**config, "in_channels": 1,
                                                         "out_channels": 1}))
    weights = saved_model / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    tensors["conv_in.weight"] = tensors["conv_in.weight"][:, :1].contiguous()
    tensors["conv_out.weight"] = tensors["conv_out.weight"][:1].contiguous()
    tensors["conv_out.bias"] = tensors["conv_out.bias"][:1].contiguous()
    save_file(tensors, weights)
    guide = write_png(tmp_path / "g.png", noise_pixels(32, 32))
    edited = sdedit_edit("--model", str(saved_model), "--guide", str(guide), "--steps", "2",
                         "--out", str(tmp_path / "o.png"))
    assert edited.exit_code == 0, edited.output  # the prior itself is fine
    manifest = tmp_path / "m.parquet"
    pq.write_table(pa.table({"id": ["a"], "guide": [str(guide)]}), manifest)
    result = CliRunner().invoke(main, ["run", str(manifest), str(tmp_path / "out"),
                                       "--model", str(saved_model), "--dry-run"])
    assert result.exit_code == 1
    assert result.output == (f"Error: model {saved_model} takes 1-channel images; sdedit run "
                             "edits RGB guides with a 3-channel prior (sdedit edit takes "
                             "others)\n")
    assert not (tmp_path / "out").exists()
