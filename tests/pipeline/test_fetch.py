"""Fetch and decode: documented conversions to RGB, and clear errors for bad inputs."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.fetch import load_guide, load_mask, prepare
from tasks.images import InputError

LIMIT = 10_000_000


def save(image: Image.Image, path, **options) -> str:
    image.save(path, **options)
    return str(path)


def test_grayscale_becomes_rgb_with_equal_channels(tmp_path):
    uri = save(Image.new("L", (8, 6), 77), tmp_path / "g.png")
    image = load_guide(uri, {}, LIMIT)
    assert image.mode == "RGB" and image.size == (8, 6)
    assert np.asarray(image)[0, 0].tolist() == [77, 77, 77]


def test_palette_becomes_rgb(tmp_path):
    palette = Image.new("RGB", (4, 4), (10, 200, 30)).convert("P", palette=Image.Palette.ADAPTIVE)
    uri = save(palette, tmp_path / "p.png")
    assert np.asarray(load_guide(uri, {}, LIMIT))[1, 1].tolist() == [10, 200, 30]


def test_sixteen_bit_is_scaled_to_eight_bits(tmp_path):
    array = np.full((4, 4), 65535, dtype=np.uint16)
    array[0, 0] = 257 * 100
    uri = save(Image.fromarray(array), tmp_path / "deep.png")
    pixels = np.asarray(load_guide(uri, {}, LIMIT))
    assert pixels[0, 0].tolist() == [100, 100, 100]
    assert pixels[1, 1].tolist() == [255, 255, 255]


def test_32_bit_integer_images_are_scaled_as_16_bit_only_when_their_values_fit(tmp_path):
    array = np.full((4, 4), 65535, dtype=np.uint16)
    array[0, 0] = 257 * 100
    sixteen = save(Image.fromarray(array), tmp_path / "deep.ppm")  # 16-bit PPM: Pillow mode I
    assert Image.open(sixteen).mode == "I"
    assert np.asarray(load_guide(sixteen, {}, LIMIT))[0, 0].tolist() == [100, 100, 100]
    wide = save(Image.fromarray(array.astype(np.int32) * 1000, "I"), tmp_path / "wide.tif")
    with pytest.raises(InputError) as error:
        load_guide(wide, {}, LIMIT)
    assert error.value.stage == "decode"
    assert str(error.value) == (f"{wide} is a 32-bit integer image with values from 25700000 "
                                "to 65535000; expected 8-bit or 16-bit values (0-65535)")
    with pytest.raises(InputError, match="32-bit integer image"):
        load_mask(wide, wide, (4, 4), {}, LIMIT)


def test_cmyk_is_converted(tmp_path):
    uri = save(Image.new("CMYK", (4, 4), (0, 0, 0, 0)), tmp_path / "c.jpg", quality=100)
    assert np.asarray(load_guide(uri, {}, LIMIT))[0, 0].tolist() == [255, 255, 255]


def test_transparency_is_composited_over_white(tmp_path):
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    rgba.putpixel((0, 0), (0, 0, 0, 255))
    pixels = np.asarray(load_guide(save(rgba, tmp_path / "a.png"), {}, LIMIT))
    assert pixels[0, 0].tolist() == [0, 0, 0]
    assert pixels[3, 3].tolist() == [255, 255, 255]


@pytest.mark.parametrize(("mode", "key", "opaque", "seen"), [
    ("L", 0, 50, [50] * 3), ("RGB", (10, 20, 30), (1, 2, 3), [1, 2, 3]),
    ("I;16", 1000, 257 * 50, [50] * 3)])
def test_a_png_transparency_key_colour_is_composited_over_white(tmp_path, mode, key, opaque,
                                                                 seen):
    image = Image.new(mode, (4, 4), key)
    image.putpixel((0, 0), opaque)
    pixels = np.asarray(load_guide(save(image, tmp_path / "k.png", transparency=key), {},
                                   LIMIT))
    assert pixels[3, 3].tolist() == [255, 255, 255]  # the key colour: transparent
    assert pixels[0, 0].tolist() == seen


def test_premultiplied_grayscale_alpha_is_composited_over_white():
    """A TIFF with associated alpha opens as mode La, which Pillow cannot convert to RGBA: the
    ValueError escaped the row and stopped the whole job."""
    from tasks.images import to_mask, to_rgb

    image = Image.new("La", (4, 4), (100, 200))  # 100 = 128 premultiplied by alpha 200
    assert np.asarray(to_rgb(image, "la.tif"))[0, 0].tolist() == [155, 155, 155]
    assert np.asarray(to_mask(image, "la.tif"))[0, 0] == 127  # unpremultiplied, truncated


def swapped_primaries_profile() -> bytes:
    """An RGB ICC profile with sRGB's red and green primaries exchanged: stored red is green."""
    import struct

    from PIL import ImageCms

    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    count = struct.unpack(">I", srgb[128:132])[0]
    at = {srgb[132 + 12 * i:136 + 12 * i]: 132 + 12 * i for i in range(count)}
    data = bytearray(srgb)
    red, green = at[b"rXYZ"], at[b"gXYZ"]  # swap the two tags' (offset, size)
    data[red + 4:red + 12], data[green + 4:green + 12] = (srgb[green + 4:green + 12],
                                                          srgb[red + 4:red + 12])
    return bytes(data)


@pytest.mark.parametrize("suffix", ["png", "jpg"])
def test_an_embedded_colour_profile_is_converted_to_srgb(tmp_path, suffix):
    """Display P3 and Adobe RGB photos were read as if sRGB (up to 60 levels off a channel)."""
    image = Image.new("RGB", (8, 8), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 4, 8))
    options = {"quality": 100, "subsampling": 0} if suffix == "jpg" else {}
    uri = save(image, tmp_path / f"swapped.{suffix}", icc_profile=swapped_primaries_profile(),
               **options)
    pixels = np.asarray(load_guide(uri, {}, LIMIT))
    assert np.abs(pixels[0, 7].astype(int) - [0, 255, 0]).max() <= 2  # stored red: green
    assert np.abs(pixels[0, 0].astype(int) - [0, 0, 255]).max() <= 2  # blue stays blue
    guide, mask = prepare(uri, uri, 4, {}, LIMIT)
    assert np.abs(np.frombuffer(guide, np.uint8).reshape(4, 4, 3)[0, 3] - [0, 255, 0]).max() <= 2
    plain = np.asarray(load_mask(save(image, tmp_path / f"plain.{suffix}", **options), uri,
                                 (8, 8), {}, LIMIT))
    assert np.frombuffer(mask, np.uint8).tolist() == np.asarray(
        Image.fromarray(plain).resize((4, 4), Image.Resampling.BILINEAR)).ravel().tolist()


@pytest.mark.parametrize("profile", ["damaged", "LAB"])
def test_a_profile_that_cannot_serve_leaves_the_values_as_stored(tmp_path, profile):
    from PIL import ImageCms

    data = (b"not an ICC profile" if profile == "damaged"
            else ImageCms.ImageCmsProfile(ImageCms.createProfile("LAB")).tobytes())
    uri = save(Image.new("RGB", (4, 4), (200, 100, 50)), tmp_path / "p.png", icc_profile=data)
    assert np.asarray(load_guide(uri, {}, LIMIT))[0, 0].tolist() == [200, 100, 50]


def test_exif_pillow_cannot_rewrite_still_turns_the_image(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: turn 90 degrees clockwise to view
    exif[0x0132] = "2020:01:01 00:00:00"
    stream = io.BytesIO()
    Image.new("RGB", (50, 40), (90, 120, 150)).save(stream, "JPEG", exif=exif.tobytes())
    # DateTime renamed to a tag whose type Pillow then expects to be a number: it reads the
    # file, but ImageOps.exif_transpose raised struct.error writing the EXIF back
    data = stream.getvalue().replace(b"\x01\x32\x00\x02", b"\x01\x55\x00\x02", 1)
    (tmp_path / "odd_exif.jpg").write_bytes(data)
    guide, _ = prepare(str(tmp_path / "odd_exif.jpg"), None, 16, {}, LIMIT)
    assert load_guide(str(tmp_path / "odd_exif.jpg"), {}, LIMIT).size == (40, 50)
    assert len(guide) == 16 * 16 * 3


def test_max_pixels_above_pillows_own_limit_is_honoured(tmp_path):
    from tasks.images import open_image

    stream = io.BytesIO()
    Image.new("1", (14_000, 13_000), 1).save(stream, "PNG")  # 182M pixels, Pillow's cap 179M
    image = open_image(stream.getvalue(), "big.png", max_pixels=200_000_000)
    assert image.size == (14_000, 13_000)
    with pytest.raises(InputError, match="over the limit of 100000000"):
        open_image(stream.getvalue(), "big.png", max_pixels=100_000_000)


def test_missing_file_is_a_read_error(tmp_path):
    with pytest.raises(InputError) as error:
        load_guide(str(tmp_path / "missing.png"), {}, LIMIT)
    assert error.value.stage == "read" and "missing.png" in str(error.value)


def test_a_uri_with_whitespace_around_it_is_quoted_and_the_whitespace_named(tmp_path):
    """A manifest made from a text file kept each line's newline: the error showed the URI with
    the newline invisible (and broke the message's line)."""
    save(Image.new("RGB", (8, 8)), tmp_path / "g.png")
    uri = f"{tmp_path}/g.png\n"
    with pytest.raises(InputError) as failed:
        load_guide(uri, {}, LIMIT)
    assert failed.value.stage == "read" and "\n" not in str(failed.value)
    assert str(failed.value).startswith(f"cannot read {uri!r}: FileNotFoundError")
    assert str(failed.value).endswith("; the URI begins or ends with whitespace, which is kept "
                                      "as part of the name: strip it in the manifest if the "
                                      "file is named without it")


def test_not_an_image_is_a_decode_error(tmp_path):
    (tmp_path / "t.png").write_text("hello")
    with pytest.raises(InputError) as error:
        load_guide(str(tmp_path / "t.png"), {}, LIMIT)
    assert error.value.stage == "decode" and "t.png" in str(error.value)


def test_truncated_image_is_a_decode_error(tmp_path):
    buffer = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert("RGB").save(buffer, "PNG")
    (tmp_path / "cut.png").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(InputError, match="cannot decode .*cut.png") as error:
        load_guide(str(tmp_path / "cut.png"), {}, LIMIT)
    assert error.value.stage == "decode"


def test_oversized_image_is_refused_before_decoding(tmp_path):
    uri = save(Image.new("RGB", (200, 100)), tmp_path / "big.png")
    with pytest.raises(InputError, match="200x100 = 20000 pixels, over the limit of 10000"):
        load_guide(uri, {}, 10_000)


def test_mask_of_the_wrong_size_is_a_validate_error(tmp_path):
    uri = save(Image.new("L", (5, 5), 255), tmp_path / "m.png")
    with pytest.raises(InputError, match="mask .*m.png is 5x5 but guide g.png is 8x6") as error:
        load_mask(uri, "g.png", (8, 6), {}, LIMIT)
    assert error.value.stage == "validate"


def test_prepare_center_crops_and_resizes_guide_and_mask(tmp_path):
    guide = Image.new("RGB", (40, 20), (255, 0, 0))
    guide.paste((0, 0, 255), (0, 0, 10, 20))  # left quarter blue: cropped away
    mask = Image.new("L", (40, 20), 0)
    mask.paste(255, (20, 0, 40, 20))  # right half white = synthesize
    pixels, mask_pixels = prepare(save(guide, tmp_path / "g.png"), save(mask, tmp_path / "m.png"),
                                  16, {}, LIMIT)
    rgb = np.frombuffer(pixels, np.uint8).reshape(16, 16, 3)
    alpha = np.frombuffer(mask_pixels, np.uint8).reshape(16, 16)
    assert rgb[:, 1].tolist() == [[255, 0, 0]] * 16
    assert alpha[:, 0].max() == 0 and alpha[:, -1].min() == 255


@pytest.mark.parametrize("marked, why", [
    (None, r"every pixel is 0 \(keep\); white \(255\) marks the region to edit"),
    ((0, 0, 8, 20), r"its edit region \(pixels \(0, 0\) to \(8, 20\)\) lies outside the centre "
                    r"square \(10, 0\) to \(30, 20\) that the model sees of the 40x20 guide"),
    # its edge meets the square's: the resize leaked a faint column into the square's first
    ((0, 0, 10, 20), r"its edit region \(pixels \(0, 0\) to \(10, 20\)\) lies outside .*"),
    ((19, 9, 20, 10), "its edit region is too small or faint to show at the model's 4x4"),
])
def test_a_mask_that_leaves_nothing_to_edit_in_the_crop_is_a_validate_error(tmp_path, marked,
                                                                            why):
    """Such a row's output would be its guide unchanged: an inverted mask, or one drawn where
    the centre crop cuts it away, was written as if edited."""
    guide = save(Image.new("RGB", (40, 20), (90, 120, 150)), tmp_path / "g.png")
    mask = Image.new("L", (40, 20), 0)
    if marked:
        mask.paste(255 if marked[2] - marked[0] > 1 else 2, marked)
    with pytest.raises(InputError, match=f"mask .*m.png leaves nothing to edit in guide "
                                         f".*g.png: {why}; the output would be the guide "
                                         "unchanged") as error:
        prepare(guide, save(mask, tmp_path / "m.png"), 4, {}, LIMIT)
    assert error.value.stage == "validate"
    mask.paste(255, (28, 0, 31, 20))  # a strip that reaches into the crop is edited
    _, kept = prepare(guide, save(mask, tmp_path / "m.png"), 4, {}, LIMIT)
    assert max(kept) > 0


def _photo(width: int, height: int) -> Image.Image:
    """A smooth photo-like RGB image."""
    coarse = np.random.default_rng(0).integers(0, 256, (12, 16, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)


def test_fast_decode_reads_a_jpeg_at_the_smallest_scale_that_covers_the_resolution(tmp_path):
    from tasks.images import open_image

    path = save(_photo(800, 600), tmp_path / "p.jpg", quality=92)
    data = Path(path).read_bytes()
    assert open_image(data, path, LIMIT).size == (800, 600)
    assert open_image(data, path, LIMIT, draft_to=64).size == (100, 75)  # 1/8: 75 >= 64
    assert open_image(data, path, LIMIT, draft_to=100).size == (200, 150)  # 1/4: 1/8 too small
    assert open_image(data, path, LIMIT, draft_to=600).size == (800, 600)  # no smaller scale
    png = save(_photo(800, 600), tmp_path / "p.png")
    assert open_image(Path(png).read_bytes(), png, LIMIT, draft_to=64).size == (800, 600)


def _grey_levels(a: bytes, b: bytes) -> np.ndarray:
    return np.abs(np.frombuffer(a, np.uint8).astype(int) - np.frombuffer(b, np.uint8).astype(int))


def test_fast_decode_guides_are_within_a_grey_level_and_masks_match_the_full_size(tmp_path):
    guide = save(_photo(1600, 1200), tmp_path / "g.jpg", quality=92)
    full, _ = prepare(guide, None, 128, {}, LIMIT)
    fast, _ = prepare(guide, None, 128, {}, LIMIT, fast_decode=True)
    difference = _grey_levels(full, fast)
    assert 0 < difference.mean() < 1.0 and difference.max() <= 8
    box = Image.new("L", (1600, 1200), 0)
    box.paste(255, (700, 400, 1100, 800))  # a square in the middle to synthesize
    mask = save(box, tmp_path / "m.png")
    (full_guide, full_mask), (fast_guide, fast_mask) = (
        prepare(guide, mask, 128, {}, LIMIT, fast_decode=fast) for fast in (False, True))
    assert fast_mask == full_mask  # the mask decodes fully either way
    assert _grey_levels(full_guide, fast_guide).mean() < 1.0
    small = save(Image.new("L", (200, 150), 255), tmp_path / "small.png")  # the 1/8 size
    with pytest.raises(InputError, match="is 200x150 but guide .*g.jpg is 1600x1200"):
        prepare(guide, small, 128, {}, LIMIT, fast_decode=True)


def test_fast_decode_masks_match_the_guide_as_its_exif_orientation_turns_it(tmp_path):
    photo = _photo(1600, 1200)
    exif = photo.getexif()
    exif[0x0112] = 6  # stored landscape, shown rotated: 1200 wide, 1600 high
    guide = save(photo, tmp_path / "turned.jpg", quality=92, exif=exif.tobytes())
    mask = save(Image.new("L", (1200, 1600), 255), tmp_path / "m.png")
    full_guide, full_mask = prepare(guide, mask, 128, {}, LIMIT)
    fast_guide, fast_mask = prepare(guide, mask, 128, {}, LIMIT, fast_decode=True)
    assert fast_mask == full_mask and _grey_levels(full_guide, fast_guide).mean() < 1.0


@pytest.mark.parametrize("orientation", range(1, 9))
def test_fast_decode_keeps_the_guide_where_a_full_decode_has_it_when_the_scale_does_not_divide(
        tmp_path, orientation):
    """A 1/8 decode of 777 pixels is 98 wide, its last column mostly past the image: cropping
    as if all 98 were the image moved and stretched the guide (9.6 levels apart on average
    from a full decode, against 1.5 here), off its full-size mask."""
    photo = _photo(777, 777)
    exif = photo.getexif()
    exif[0x0112] = orientation
    guide = save(photo, tmp_path / "odd.jpg", quality=95, exif=exif.tobytes())
    full, _ = prepare(guide, None, 64, {}, LIMIT)
    fast, _ = prepare(guide, None, 64, {}, LIMIT, fast_decode=True)
    assert _grey_levels(full, fast).mean() < 1.0


def test_a_file_larger_than_any_image_within_the_pixel_limit_is_refused_unread(tmp_path):
    """A multi-GB object named as a guide was read whole into the fetch worker's memory before
    the pixel limit could refuse it."""
    from tasks.images import file_limit

    assert file_limit(100) == 2400 + 2**20
    huge = tmp_path / "huge.png"
    huge.write_bytes(b"\x89PNG" + bytes(file_limit(100)))  # 4 bytes over the limit
    with pytest.raises(InputError) as error:
        prepare(str(huge), None, 8, {}, max_pixels=100)
    assert error.value.stage == "read"
    assert str(error.value) == (f"{huge} is larger than {file_limit(100):,} bytes, more than an "
                                "image within the pixel limit (--max-pixels) needs")
    import tracemalloc

    with open(huge, "r+b") as sparse:  # 256 MiB: read whole, a bytes object of that size
        sparse.truncate(256 << 20)
    tracemalloc.start()
    try:
        with pytest.raises(InputError, match="is larger than"):
            prepare(str(huge), None, 8, {}, max_pixels=100)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, peak  # the limit and a little more were read, not the file
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(InputError) as error:
        prepare(str(tmp_path / "empty.png"), None, 8, {}, max_pixels=100)
    assert error.value.stage == "decode"


def test_errors_whose_cause_carries_another_kind_of_response_are_sorted_too():
    """huggingface_hub chains a requests Response (no .get) under its FileNotFoundError: the
    lookup of an S3 error code raised AttributeError, which stopped the whole run."""
    from tasks.images import _error_code, _may_pass

    class RepositoryNotFound(Exception):
        response = object()

    missing = FileNotFoundError("hf://datasets/someone/images/cat.png")
    missing.__cause__ = RepositoryNotFound()
    assert _error_code(missing) is None and _may_pass(missing) is False


def test_a_region_the_store_refuses_to_sign_for_stops_the_run_instead_of_failing_each_row():
    """S3 answers AuthorizationHeaderMalformed when requests are signed for another region
    than the bucket's: every row of that bucket fails alike, so it is the store's failure
    (None), as refused credentials are, not each row's read error (False)."""
    from botocore.exceptions import ClientError
    from s3fs.errors import translate_boto_error

    from tasks.images import _may_pass

    def as_s3fs_raises(code: str) -> OSError:
        answer = ClientError({"Error": {"Code": code, "Message": "the region 'us-east-1' is "
                                        "wrong; expecting 'eu-west-1'"},
                              "ResponseMetadata": {"HTTPStatusCode": 400}}, "GetObject")
        try:
            raise translate_boto_error(answer) from answer
        except OSError as error:
            return error

    assert _may_pass(as_s3fs_raises("AuthorizationHeaderMalformed")) is None
    assert _may_pass(as_s3fs_raises("InvalidRequest")) is False  # one request's own fault


def test_commits_wait_out_outages_but_not_refused_credentials():
    """Writes and lease reads retry what may pass; s3fs raises refused credentials as
    OSError EINVAL (an HTTP 400), which was retried for 15 s like an outage."""
    from botocore.exceptions import ClientError, EndpointConnectionError
    from s3fs.errors import translate_boto_error

    from tasks.images import store_may_pass

    def refused(code: str) -> OSError:
        answer = ClientError({"Error": {"Code": code, "Message": "refused"},
                              "ResponseMetadata": {"HTTPStatusCode": 400}}, "PutObject")
        try:
            raise translate_boto_error(answer) from answer
        except OSError as error:
            return error

    for code in ("AuthorizationHeaderMalformed", "InvalidToken", "TokenRefreshRequired"):
        assert store_may_pass(refused(code)) is False, code
    assert store_may_pass(EndpointConnectionError(endpoint_url="http://127.0.0.1:1"))
    assert store_may_pass(ConnectionResetError()) and store_may_pass(refused("SlowDown"))
    assert not store_may_pass(FileNotFoundError("b/out/_run_lease.json"))


def test_a_decode_error_says_the_same_on_every_run(tmp_path):
    """Pillow named its in-memory buffer: "cannot identify image file <_io.BytesIO object at
    0x7fac...>", an address that differed from run to run in committed error rows."""
    (tmp_path / "text.png").write_bytes(b"no image in here")
    with pytest.raises(InputError) as error:
        prepare(str(tmp_path / "text.png"), None, 8, {}, max_pixels=100)
    assert str(error.value) == (
        f"cannot decode {tmp_path}/text.png as an image (UnidentifiedImageError: cannot identify "
        "image file); expected a complete PNG, JPEG, WebP or other Pillow format")


def test_an_image_over_the_limit_is_an_error_row_without_pillows_warning(monkeypatch):
    """Pillow's DecompressionBombWarning reached the console from fetch workers for images the
    --max-pixels guard refuses anyway."""
    import warnings

    from tasks.images import open_image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow warns above it
    encoded = io.BytesIO()
    Image.new("RGB", (40, 40)).save(encoded, "PNG")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(InputError, match=r"x\.png is 40x40 = 1600 pixels, over the limit "
                                             r"of 1000"):
            open_image(encoded.getvalue(), "x.png", 1000)
    assert [w.category.__name__ for w in caught] == []
