"""Guide builders and manifests with a real S3-compatible store (SeaweedFS on loopback)."""

from __future__ import annotations

import io
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image
from task_fixtures import flat, photo, png_bytes, write_output

from pipeline.cli import main


def storage_flags(options: dict) -> list[str]:
    return [
        flag for key, value in options.items() for flag in ("--storage-option", f"{key}={value}")
    ]


@pytest.mark.slow
def test_strokes_from_a_bucket_to_a_bucket(ray_local, s3_server):
    import s3fs

    fs = s3fs.S3FileSystem(**s3_server.storage_options, skip_instance_cache=True)
    bucket = s3_server.new_bucket().removeprefix("s3://")
    for folder, name in (("cats", "chelsea"), ("things", "coffee"), ("things", "rocket")):
        buffer = io.BytesIO()
        photo(name).save(buffer, format="PNG")
        fs.pipe(f"{bucket}/in/{folder}/{name}.png", buffer.getvalue())

    runner = CliRunner()
    flags = storage_flags(s3_server.storage_options)
    result = runner.invoke(
        main, ["manifest", f"s3://{bucket}/in", f"s3://{bucket}/photos.parquet", *flags]
    )
    assert result.exit_code == 0, result.output
    result = runner.invoke(
        main,
        ["guides", "strokes", f"s3://{bucket}/photos.parquet", f"s3://{bucket}/strokes", *flags],
    )
    assert result.exit_code == 0, result.output + repr(result.exception)

    with fs.open(f"{bucket}/strokes/manifest.parquet", "rb") as file:
        rows = pq.read_table(file).to_pylist()
    assert [row["id"] for row in rows] == ["cats__chelsea", "things__coffee", "things__rocket"]
    assert [row["label"] for row in rows] == ["cats", "things", "things"]
    assert all(row["source"].startswith(f"s3://{bucket}/in/") for row in rows)
    for row in rows:
        guide = Image.open(io.BytesIO(fs.cat(f"{bucket}/strokes/{row['guide']}")))
        assert guide.size == (64, 48)
        assert len(np.unique(np.asarray(guide).reshape(-1, 3), axis=0)) <= 12
    # again from the things alone, overwriting: the cat's guide goes from the bucket too
    result = runner.invoke(main, ["guides", "strokes", f"s3://{bucket}/in/things",
                                  f"s3://{bucket}/strokes", "--overwrite", *flags])
    assert result.exit_code == 0, result.output + repr(result.exception)
    fs.invalidate_cache()
    assert sorted(path.rsplit("/", 1)[-1] for path in fs.find(f"{bucket}/strokes/guides")) == [
        "coffee.png", "rocket.png"]


@pytest.mark.slow
def test_inspect_and_evaluate_an_output_in_a_bucket(s3_server, tmp_path):
    import s3fs

    from tasks.inspect import sheet_size

    fs = s3fs.S3FileSystem(**s3_server.storage_options, skip_instance_cache=True)
    bucket = s3_server.new_bucket().removeprefix("s3://")
    guide = flat(100)
    fs.pipe(f"{bucket}/run/guides/a.png", png_bytes(guide))
    outputs = [
        {"id": "a", "t0": t0, "image": flat(110), "guide": "guides/a.png"} for t0 in (0.3, 0.6)
    ]
    summary = {"config": {"manifest": f"s3://{bucket}/run/manifest.parquet"}}
    local = write_output(tmp_path / "out", outputs, [], summary)
    fs.put(str(local) + "/", f"{bucket}/out/", recursive=True)

    flags = storage_flags(s3_server.storage_options)
    result = CliRunner().invoke(main, ["inspect", f"s3://{bucket}/out", "--cell", "32", *flags])
    assert result.exit_code == 0, result.output + repr(result.exception)
    sheet = Image.open(io.BytesIO(fs.cat(f"{bucket}/out/inspect/contact_sheet.png")))
    assert sheet.size == sheet_size(1, 4, 32)
    result = CliRunner().invoke(main, ["evaluate", f"s3://{bucket}/out", *flags])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert '"outputs_scored": 2' in fs.cat(f"{bucket}/out/evaluation.json").decode()

    time.sleep(1.1)  # LastModified counts whole seconds
    later = write_output(tmp_path / "later", [{"id": "b", "t0": 0.3, "image": flat(120)}])
    fs.put(str(later / "data" / "part-0.parquet"), f"{bucket}/out/data/part-9.parquet")
    s3fs.S3FileSystem.clear_instance_cache()  # as a new process: no listing cached from above
    for newest, shown in (["--newest"], "b"), ([], "a"):
        result = CliRunner().invoke(main, ["inspect", f"s3://{bucket}/out", "-n", "1", *newest,
                                           *flags])
        assert result.exit_code == 0, result.output + repr(result.exception)
        page = fs.cat(f"{bucket}/out/inspect/contact_sheet.html").decode()
        assert f"<td class='id'>{shown}</td>" in page, newest
