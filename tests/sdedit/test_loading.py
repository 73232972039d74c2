"""sdedit.load: diffusers-format folders (saved with real diffusers classes), URIs, builtins,
the schedule read from the scheduler config, dtype adapters and the errors users will meet."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import os
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

import sdedit
from sdedit.loading import ModelLoadError, describe
from sdedit.models import UNetAdapter

SMALL_UNET = dict(
    sample_size=32, in_channels=3, out_channels=3, layers_per_block=1,
    block_out_channels=(8, 16), norm_num_groups=4,
    down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
)

# diffusers' default DDPM betas: linear 1e-4..0.02 over 1000 steps, computed in float32.
DDPM = sdedit.VPSchedule(torch.linspace(1e-4, 0.02, 1000, dtype=torch.float32))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def small_unet(seed: int = 0, **overrides):
    """A ~20k-parameter UNet2DModel with seeded random weights."""
    from diffusers import UNet2DModel

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return UNet2DModel(**{**SMALL_UNET, **overrides}).eval()


def save_flat(folder, unet, scheduler, safe: bool = True):
    """UNet config + weights and scheduler_config.json side by side, as save_pretrained writes."""
    unet.save_pretrained(folder, safe_serialization=safe)
    scheduler.save_pretrained(folder)
    return folder


@pytest.fixture
def ddpm_folder(tmp_path):
    from diffusers import DDPMScheduler

    unet = small_unet()
    return save_flat(tmp_path / "ddpm", unet, DDPMScheduler(num_train_timesteps=1000)), unet


def run_edit(model, schedule, seed: int = 3) -> torch.Tensor:
    """A masked strided edit of a fixed 32x32 guide, with per-sample generators."""
    with torch.random.fork_rng():
        torch.manual_seed(11)
        guide = torch.rand(2, 3, 32, 32) * 2 - 1
    mask = torch.zeros(2, 1, 32, 32)
    mask[:, :, 8:24, 8:24] = 1
    return sdedit.edit(model, schedule, guide, t0=torch.tensor([0.3, 0.6]), mask=mask, steps=3,
                       generator=sdedit.generators([seed, seed + 1]))


# --- loading a folder saved with save_pretrained ------------------------------------------


def test_plain_path_and_file_uri_load_the_same_model(ddpm_folder):
    folder, unet = ddpm_folder
    by_path = sdedit.load(str(folder), device="cpu")
    by_uri = sdedit.load(f"file://{folder}", device="cpu")
    for prior in (by_path, by_uri):
        assert isinstance(prior.schedule, sdedit.VPSchedule)
        assert (prior.resolution, prior.channels) == (32, 3)
        assert prior.device == torch.device("cpu")
    assert by_path.name == str(folder)
    assert by_uri.name == f"file://{folder}"
    weights = (folder / "diffusion_pytorch_model.safetensors").read_bytes()
    assert by_path.digest == by_uri.digest == "sha256:" + hashlib.sha256(weights).hexdigest()


def test_schedule_comes_from_the_scheduler_config(ddpm_folder):
    folder, _ = ddpm_folder
    schedule = sdedit.load(folder, device="cpu").schedule
    reference = sdedit.VPSchedule.linear()
    assert schedule.num_timesteps == 1000
    torch.testing.assert_close(schedule.alphas_cumprod, reference.alphas_cumprod, rtol=1e-6,
                               atol=0)


def test_custom_ddim_betas_are_read(tmp_path):
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(num_train_timesteps=200, beta_start=0.001, beta_end=0.03)
    folder = save_flat(tmp_path / "ddim", small_unet(), scheduler)
    schedule = sdedit.load(folder, device="cpu").schedule
    assert schedule.num_timesteps == 200
    torch.testing.assert_close(schedule.betas, torch.linspace(0.001, 0.03, 200,
                                                              dtype=torch.float64),
                               rtol=1e-6, atol=0)


def test_loaded_model_matches_the_in_memory_model(ddpm_folder):
    folder, unet = ddpm_folder
    prior = sdedit.load(folder, device="cpu")
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10, 700])
    with torch.inference_mode():
        expected = unet(x, t).sample
    assert torch.equal(prior.model(x, t), expected)
    assert torch.equal(run_edit(prior.model, prior.schedule), run_edit(UNetAdapter(unet), DDPM))


def test_pipeline_folder_layout(tmp_path):
    from diffusers import DDPMPipeline, DDPMScheduler

    unet = small_unet(seed=5)
    folder = tmp_path / "pipeline"
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(folder)
    assert (folder / "unet" / "config.json").exists()
    assert (folder / "scheduler" / "scheduler_config.json").exists()
    prior = sdedit.load(folder, device="cpu")
    assert isinstance(prior.schedule, sdedit.VPSchedule)
    assert torch.equal(run_edit(prior.model, prior.schedule),
                       run_edit(UNetAdapter(unet), DDPM))


def test_a_score_sde_ve_prior_runs_in_the_image_range_its_network_was_trained_on(tmp_path):
    """VE networks (score_sde's NCSN++, diffusers' ScoreSdeVePipeline) model images in [0, 1];
    they were given the guide in [-1, 1], so a black guide pixel (0 to the network) was -1 and
    outputs came back washed out. A step in [-1, 1] must be the paper's step in [0, 1]."""
    from diffusers import ScoreSdeVeScheduler

    from sdedit.samplers import ve_euler_maruyama_step

    unet = small_unet(time_embedding_type="fourier")
    scheduler = ScoreSdeVeScheduler(sigma_min=0.02, sigma_max=80.0)
    prior = sdedit.load(save_flat(tmp_path / "ve", unet, scheduler), device="cpu")
    assert prior.schedule == sdedit.VESchedule(sigma_min=0.04, sigma_max=160.0)  # x = 2y - 1
    generator = torch.Generator().manual_seed(0)
    y = torch.rand(2, 3, 32, 32, generator=generator)  # images as the network knows them
    z = torch.randn(2, 3, 32, 32, generator=generator)
    t, s = torch.tensor([0.5, 0.3], dtype=torch.float64), torch.tensor([0.4, 0.0])
    sigma_y = 0.02 * (80.0 / 0.02) ** t  # the scheduler config's sigmas, in y units
    variance = (sigma_y**2 - (0.02 * (80.0 / 0.02) ** s) ** 2).float().view(2, 1, 1, 1)
    with torch.no_grad():
        y_next = y + variance * unet(y, sigma_y.float()).sample
    y_next[0] += variance[0].sqrt() * z[0]  # noise, except on the step to t = 0
    x_next = ve_euler_maruyama_step(prior.model, prior.schedule, 2 * y - 1, t, s, z)
    torch.testing.assert_close(x_next, 2 * y_next - 1, atol=1e-4, rtol=1e-4)


def test_pickle_weights_need_allow_pickle(tmp_path):
    from diffusers import DDPMScheduler

    unet = small_unet(seed=2)
    folder = save_flat(tmp_path / "pickled", unet, DDPMScheduler(), safe=False)
    assert (folder / "diffusion_pytorch_model.bin").exists()
    with pytest.raises(ModelLoadError, match="pickle") as caught:
        sdedit.load(folder, device="cpu")
    assert "allow_pickle" in str(caught.value)
    prior = sdedit.load(folder, device="cpu", allow_pickle=True)
    assert torch.equal(run_edit(prior.model, prior.schedule),
                       run_edit(UNetAdapter(unet), DDPM))


# --- errors --------------------------------------------------------------------------------


def test_missing_folder(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelLoadError, match="does not exist") as caught:
        sdedit.load(missing)
    assert str(missing) in str(caught.value)
    with pytest.raises(ModelLoadError, match="does not exist"):
        sdedit.load(f"file://{missing}")


def test_a_file_is_not_a_model_folder(ddpm_folder):
    folder, _ = ddpm_folder
    with pytest.raises(ModelLoadError, match="is a file"):
        sdedit.load(folder / "config.json")


def test_wrong_model_class(tmp_path):
    from diffusers import AutoencoderKL, DDPMScheduler

    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=2)
    folder = tmp_path / "vae"
    vae.save_pretrained(folder)
    DDPMScheduler().save_pretrained(folder)
    with pytest.raises(ModelLoadError, match="UNet2DModel") as caught:
        sdedit.load(folder)
    assert "AutoencoderKL" in str(caught.value)


def test_unsupported_scheduler(tmp_path):
    from diffusers import EulerDiscreteScheduler

    folder = save_flat(tmp_path / "euler", small_unet(), EulerDiscreteScheduler())
    with pytest.raises(ModelLoadError, match="unsupported scheduler") as caught:
        sdedit.load(folder)
    message = str(caught.value)
    assert "EulerDiscreteScheduler" in message and "DDPMScheduler" in message


def test_v_prediction_is_refused(tmp_path):
    from diffusers import DDPMScheduler

    folder = save_flat(tmp_path / "v", small_unet(), DDPMScheduler(prediction_type="v_prediction"))
    with pytest.raises(ModelLoadError, match="epsilon"):
        sdedit.load(folder)


def test_missing_scheduler_config_and_weights(tmp_path):
    folder = tmp_path / "unet-only"
    small_unet().save_pretrained(folder)
    with pytest.raises(ModelLoadError, match="scheduler_config.json"):
        sdedit.load(folder)
    config = json.loads((folder / "config.json").read_text())
    empty = tmp_path / "config-only"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="safetensors"):
        sdedit.load(empty)


def test_hub_id_while_offline(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.chdir(tmp_path)  # so the id cannot resolve to a local folder
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    # huggingface_hub reads the variables when first imported; diffusers may have done that.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    with pytest.raises(ModelLoadError) as caught:
        sdedit.load("google/ddpm-ema-church-256")
    message = str(caught.value)
    assert "google/ddpm-ema-church-256" in message
    assert "offline" in message and "hub" in message


def test_unknown_builtin():
    with pytest.raises(ValueError, match="tiny"):
        sdedit.load("builtin:huge")


def test_unknown_dtype():
    with pytest.raises(ValueError, match="bfloat16"):
        sdedit.load("builtin:tiny", dtype="int8")


# --- builtins, digests, dtypes -------------------------------------------------------------


@pytest.mark.parametrize(("uri", "kind"), [("builtin:tiny", sdedit.VPSchedule),
                                           ("builtin:tiny-ve", sdedit.VESchedule)])
def test_builtins_load_and_run(uri, kind):
    prior = sdedit.load(uri, device="cpu")
    assert isinstance(prior.schedule, kind)
    assert (prior.resolution, prior.channels, prior.name) == (64, 3, uri)
    params = sum(p.numel() for p in prior.model.parameters())
    assert 50_000 < params < 500_000
    guide = torch.zeros(1, 3, 64, 64)
    out = prior.edit(guide, t0=0.2, steps=2, generator=sdedit.generators([0]))
    assert out.shape == guide.shape and out.dtype == torch.float32
    assert bool(torch.isfinite(out).all())


def test_digest_is_stable_across_loads(ddpm_folder):
    assert sdedit.load("builtin:tiny").digest == sdedit.load("builtin:tiny").digest
    assert sdedit.load("builtin:tiny").digest != sdedit.load("builtin:tiny-ve").digest
    folder, _ = ddpm_folder
    first, second = sdedit.load(folder).digest, sdedit.load(folder).digest
    assert first == second and first.startswith("sha256:") and len(first) == 7 + 64


@pytest.mark.slow
def test_a_model_replaced_in_the_bucket_is_fetched_again(s3_server, ddpm_folder, tmp_path,
                                                         monkeypatch):
    import s3fs
    from diffusers import DDPMScheduler

    monkeypatch.setenv("SDEDIT_CACHE", str(tmp_path / "cache"))
    fs = s3fs.S3FileSystem(**s3_server.storage_options)
    uri = f"{s3_server.new_bucket()}/models/ddpm"
    folder, _ = ddpm_folder
    fs.put(f"{folder}/", f"{uri}/", recursive=True)
    first = sdedit.load(uri, storage_options=s3_server.storage_options)
    assert first.digest == sdedit.load(folder).digest
    assert sdedit.load(uri, storage_options=s3_server.storage_options).digest == first.digest
    cache = tmp_path / "cache" / "models"
    (old_copy,) = cache.iterdir()
    retrained = save_flat(tmp_path / "retrained", small_unet(seed=1),
                          DDPMScheduler(num_train_timesteps=1000))
    fs.put(f"{retrained}/", f"{uri}/", recursive=True)  # same names, new weights
    legacy = cache / ("0123456789abcdef" * 2)  # how earlier releases named their copies
    killed, running = cache / ".partial-killed", cache / ".partial-running"
    for leftover in (legacy, killed, running):
        leftover.mkdir()
    two_days_ago = time.time() - 2 * 24 * 3600
    os.utime(killed, (two_days_ago, two_days_ago))
    second = sdedit.load(uri, storage_options=s3_server.storage_options)
    assert second.digest == sdedit.load(retrained).digest != first.digest
    assert describe(uri, storage_options=s3_server.storage_options).digest == second.digest
    # The new copy replaced the old one; the legacy folder and the day-old download went too.
    (new_copy,) = (path for path in cache.iterdir() if not path.name.startswith("."))
    assert new_copy.name.split("-")[0] == old_copy.name.split("-")[0] and new_copy != old_copy
    assert sorted(path.name for path in cache.iterdir()) == [".partial-running", new_copy.name]


def test_builtin_weights_do_not_depend_on_global_rng():
    torch.manual_seed(123)
    first = sdedit.load("builtin:tiny")
    torch.manual_seed(456)
    assert sdedit.load("builtin:tiny").digest == first.digest


def test_bfloat16_adapter_returns_float32_close_to_float32():
    full = sdedit.load("builtin:tiny", device="cpu")
    half = sdedit.load("builtin:tiny", device="cpu", dtype="bfloat16")
    assert next(half.model.unet.parameters()).dtype == torch.bfloat16
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([100, 400])
    reference, approx = full.model(x, t), half.model(x, t)
    assert approx.dtype == torch.float32 and approx.shape == x.shape
    relative = float((approx - reference).norm() / reference.norm())
    assert 0 < relative < 0.05
    out = half.edit(x.clamp(-1, 1), t0=0.3, steps=2, generator=sdedit.generators([1, 2]))
    assert out.dtype == torch.float32 and bool(torch.isfinite(out).all())


def test_a_half_precision_load_logs_no_diffusers_cast_warning(capfd):
    # diffusers warns on every dtype cast, even with no module to keep in float32, and each
    # actor of a bfloat16 run printed it to the job's log
    capfd.readouterr()
    half = sdedit.load("builtin:tiny", device="cpu", dtype="bfloat16")
    assert {p.dtype for p in half.model.unet.parameters()} == {torch.bfloat16}
    assert "kept in float32" not in "".join(capfd.readouterr())


# --- describe: what load would give, without building the network --------------------------


def test_describe_matches_load_for_folders_builtins_and_the_default(ddpm_folder, tmp_path):
    from diffusers import DDPMScheduler

    folder, _ = ddpm_folder
    layout = tmp_path / "pipeline-layout"
    small_unet(seed=4, sample_size=16).save_pretrained(layout / "unet")
    DDPMScheduler().save_pretrained(layout / "scheduler")
    for uri in (str(folder), f"file://{folder}", str(layout), "default", "builtin:tiny"):
        prior, info = sdedit.load(uri, device="cpu"), describe(uri)
        assert (info.name, info.digest, info.resolution, info.channels) == (
            prior.name, prior.digest, prior.resolution, prior.channels), uri
    assert describe(str(layout)).resolution == 16


def _bad_folders(tmp_path) -> dict:
    """Folders that load refuses, each with a pattern its message must contain (the file it
    blames, where it blames one)."""
    from diffusers import DDPMPipeline, DDPMScheduler, EulerDiscreteScheduler, ScoreSdeVeScheduler

    pickled = save_flat(tmp_path / "pickled", small_unet(), DDPMScheduler(), safe=False)
    euler = save_flat(tmp_path / "euler", small_unet(), EulerDiscreteScheduler())
    v_pred = save_flat(tmp_path / "v", small_unet(), DDPMScheduler(prediction_type="v_prediction"))
    no_scheduler = tmp_path / "unet-only"
    small_unet().save_pretrained(no_scheduler)
    cosine = save_flat(tmp_path / "cosine", small_unet(), DDPMScheduler())
    _edit_json(cosine / "scheduler_config.json", beta_schedule="cosine")
    ve_sigmas = save_flat(tmp_path / "ve-sigmas", small_unet(time_embedding_type="fourier"),
                          ScoreSdeVeScheduler(sigma_min=80.0, sigma_max=0.02))
    bad_json = save_flat(tmp_path / "bad-json", small_unet(), DDPMScheduler())
    (bad_json / "config.json").write_text('{"_class_name": "UNet2DModel",\n')
    no_size = save_flat(tmp_path / "no-size", small_unet(), DDPMScheduler())
    _edit_json(no_size / "config.json", sample_size=None)
    truncated = save_flat(tmp_path / "truncated", small_unet(), DDPMScheduler())
    weights = truncated / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    other_config = save_flat(tmp_path / "other-config", small_unet(), DDPMScheduler())
    _edit_json(other_config / "config.json", block_out_channels=[16, 16])
    learned = save_flat(tmp_path / "learned", small_unet(out_channels=6),
                        DDPMScheduler(variance_type="learned_range"))
    latent = tmp_path / "latent"  # laid out as CompVis/ldm-celebahq-256: a VQ-VAE's latents
    DDPMPipeline(unet=small_unet(), scheduler=DDPMScheduler()).save_pretrained(latent)
    _edit_json(latent / "model_index.json", _class_name="LDMPipeline",
               vqvae=["diffusers", "VQModel"])
    class_labels = save_flat(tmp_path / "class-labels", small_unet(num_class_embeds=10),
                             DDPMScheduler())
    vp_fourier = save_flat(tmp_path / "vp-fourier", small_unet(time_embedding_type="fourier"),
                           DDPMScheduler())
    wide = save_flat(tmp_path / "wide", small_unet(), DDPMScheduler())
    _edit_json(wide / "config.json", sample_size=[16, 32])
    return {tmp_path / "missing": "does not exist", pickled: "pickle",
            class_labels: r"class-labels/config\.json describes a class-conditioned UNet "
                          r"\(num_class_embeds=10\)",
            vp_fourier: r"time_embedding_type='fourier' .* but the scheduler is DDPMScheduler",
            wide: r"sample_size=\[16, 32\] \(height, width\); only square models",
            euler: "unsupported scheduler", v_pred: "epsilon",
            no_scheduler: "scheduler_config.json", cosine: "unsupported beta_schedule 'cosine'",
            ve_sigmas: "expected 0 < sigma_min < sigma_max",
            bad_json: r"bad-json/config\.json is not valid JSON",
            no_size: r"no-size/config\.json has sample_size=None",
            truncated: r"cannot read the weights \S*truncated/diffusion_pytorch_model\.safetensors",
            other_config: r"do not match \S*other-config/config\.json: conv_in\.weight",
            learned: r"learned/config\.json has in_channels=3 and out_channels=6",
            latent: r"model_index\.json describes a LDMPipeline with vqvae besides"}


def test_weights_that_lack_tensors_of_the_model_are_refused(ddpm_folder):
    """diffusers fills missing tensors with random values (and logs a line): the prior loaded
    and edited differently on every load."""
    from safetensors.torch import load_file, save_file

    folder, _ = ddpm_folder
    weights = folder / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    del tensors["conv_out.weight"], tensors["time_embedding.linear_1.weight"]
    save_file(tensors, weights)
    with pytest.raises(ModelLoadError, match=(
            r"the weights diffusion_pytorch_model\.safetensors lack 2 tensors the UNet of its "
            r"config\.json has \(e\.g\. conv_out\.weight, time_embedding\.linear_1\.weight\)")):
        sdedit.load(folder, device="cpu")


def test_the_config_digest_follows_the_schedule_and_not_how_its_file_is_written(ddpm_folder):
    """The record held the weights' digest only: an edited scheduler config (other betas)
    made other images into the same OUTPUT."""
    folder, _ = ddpm_folder
    first = describe(folder)
    _edit_json(folder / "scheduler_config.json", _diffusers_version="9.9.9", beta_end=0.02,
               _class_name="DDIMScheduler", trained_betas=None, clip_sample=False)
    assert describe(folder) == first  # the same betas: this package samples them alike
    _edit_json(folder / "scheduler_config.json", beta_end=0.03)
    changed = describe(folder)
    assert changed.digest == first.digest and changed.config_digest != first.config_digest
    assert first.config_digest.startswith("sha256:")
    assert describe("builtin:tiny").config_digest is None


def _edit_json(path, **changes) -> None:
    """Rewrite a JSON config with `changes` (None removes the key)."""
    values = {**json.loads(path.read_text()), **changes}
    path.write_text(json.dumps({k: v for k, v in values.items() if v is not None}))


def test_describe_refuses_what_load_refuses_with_the_same_message(tmp_path):
    for folder, word in _bad_folders(tmp_path).items():
        with pytest.raises(ModelLoadError, match=word) as described:
            describe(folder)
        with pytest.raises(ModelLoadError) as loaded:
            sdedit.load(folder, device="cpu")
        assert str(described.value) == str(loaded.value), folder


@pytest.mark.parametrize(("file", "changes", "blamed"), [
    ("config.json", dict(norm_num_groups=3), "config.json"),  # widths 8, 16: no groups of 3
    ("scheduler_config.json", dict(trained_betas=[0.5, 1.5]), "scheduler_config.json"),
])
def test_what_diffusers_or_the_schedule_refuses_names_the_uri_and_the_file(
        tmp_path, file, changes, blamed):
    from diffusers import DDPMScheduler

    folder = save_flat(tmp_path / "model", small_unet(), DDPMScheduler())
    _edit_json(folder / file, **changes)
    with pytest.raises(ModelLoadError) as loaded:
        sdedit.load(folder, device="cpu")
    message = str(loaded.value)
    assert message.startswith(f"model {folder}: cannot build the ") and blamed in message


def test_the_beta_schedules_describe_accepts_are_those_diffusers_builds():
    from diffusers import DDPMScheduler

    from sdedit.loading import BETA_SCHEDULES

    for name in BETA_SCHEDULES:
        assert len(DDPMScheduler(beta_schedule=name).betas) == 1000, name
    with pytest.raises(NotImplementedError):
        DDPMScheduler(beta_schedule="cosine")


# --- model folders on a web server ---------------------------------------------------------


class ModelFolder(http.server.SimpleHTTPRequestHandler):
    """Serves a folder as `python -m http.server` does; counts GETs by path and, when
    `versions` is False, sends no Last-Modified (as servers of generated pages do)."""

    gets: Counter = Counter()
    versions = True

    def do_GET(self):  # noqa: N802 (http.server's name)
        self.gets[self.path] += 1
        super().do_GET()

    def send_header(self, keyword, value):
        if self.versions or keyword != "Last-Modified":
            super().send_header(keyword, value)

    def log_message(self, *args):
        pass


@pytest.fixture
def web_root(tmp_path):
    """(folder served, base URL) of a web server on loopback."""
    root = tmp_path / "www"
    root.mkdir()
    ModelFolder.gets, ModelFolder.versions = Counter(), True
    handler = functools.partial(ModelFolder, directory=str(root))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def copy_folder(folder: Path, served: Path) -> Path:
    """A copy of a model folder's files under the web root, to be served there."""
    served.mkdir()
    for file in folder.iterdir():
        (served / file.name).write_bytes(file.read_bytes())
    return served


@pytest.mark.parametrize("versions", [True, False], ids=["last-modified", "no-version-headers"])
def test_a_model_replaced_on_a_web_server_is_fetched_again(web_root, ddpm_folder, tmp_path,
                                                           monkeypatch, versions):
    """fsspec's listing of an http folder gives no size and no version: HEAD gives them, and
    without Last-Modified or ETag the folder is fetched on every load."""
    from diffusers import DDPMScheduler

    monkeypatch.setenv("SDEDIT_CACHE", str(tmp_path / "cache"))
    ModelFolder.versions = versions
    root, base = web_root
    folder, _ = ddpm_folder
    served = copy_folder(folder, root / "ddpm")
    uri, weights = f"{base}/ddpm/", "/ddpm/diffusion_pytorch_model.safetensors"
    first = sdedit.load(uri, device="cpu")
    assert first.digest == sdedit.load(folder).digest == describe(uri).digest
    assert ModelFolder.gets[weights] == (1 if versions else 2)  # a known version is reused
    retrained = save_flat(tmp_path / "retrained", small_unet(seed=1),
                          DDPMScheduler(num_train_timesteps=1000))
    new_weights = (retrained / "diffusion_pytorch_model.safetensors").read_bytes()
    assert len(new_weights) == (served / "diffusion_pytorch_model.safetensors").stat().st_size
    (served / "diffusion_pytorch_model.safetensors").write_bytes(new_weights)  # same size
    later = time.time() + 10  # what a replacement seconds later gets (Last-Modified has 1 s)
    os.utime(served / "diffusion_pytorch_model.safetensors", (later, later))
    second = sdedit.load(uri, device="cpu")
    assert second.digest == sdedit.load(retrained).digest != first.digest
    assert describe(uri).digest == second.digest
    copies = list((tmp_path / "cache" / "models").iterdir())
    assert len(copies) == 1  # the copy of the old weights was removed


def test_only_the_files_a_prior_is_loaded_from_are_fetched(web_root, ddpm_folder, tmp_path,
                                                           monkeypatch):
    """A trainer's checkpoint/ beside the model (as `sdedit train` leaves it) was copied too:
    1.2 of a 1.5 MB download, never read."""
    monkeypatch.setenv("SDEDIT_CACHE", str(tmp_path / "cache"))
    root, base = web_root
    served = copy_folder(ddpm_folder[0], root / "ddpm")
    (served / "checkpoint").mkdir()
    (served / "checkpoint" / "state.safetensors").write_bytes(b"x" * 1000)
    (served / "README.md").write_text("model card")
    prior = sdedit.load(f"{base}/ddpm/", device="cpu")
    assert prior.digest == sdedit.load(ddpm_folder[0]).digest
    assert ModelFolder.gets["/ddpm/diffusion_pytorch_model.safetensors"] == 1
    assert not [path for path in ModelFolder.gets if "checkpoint/state" in path or "README" in path]
    (copy,) = (tmp_path / "cache" / "models").iterdir()
    assert sorted(p.name for p in copy.iterdir()) == [
        "config.json", "diffusion_pytorch_model.safetensors", "scheduler_config.json"]


def test_a_hub_download_takes_the_prior_and_not_the_rest_of_a_pipeline():
    """`*.safetensors` patterns (fnmatch's `*` crosses '/') took a Stable Diffusion
    repository's text encoder, VAE and fp16 variants: gigabytes before the load failed."""
    from huggingface_hub.utils import filter_repo_objects

    from sdedit.loading import hub_files

    repository = ["model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.bin",
                  "unet/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json",
                  "unet/diffusion_pytorch_model.fp16.safetensors", "vae/config.json",
                  "vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
                  "a/b/c.safetensors", "README.md"]
    assert sorted(filter_repo_objects(repository, allow_patterns=hub_files(False))) == [
        "model_index.json", "scheduler/scheduler_config.json", "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors"]
    assert "unet/diffusion_pytorch_model.bin" in filter_repo_objects(
        repository, allow_patterns=hub_files(True))


def test_a_store_error_that_repeats_a_uri_secret_is_masked():
    """botocore quotes `key:secret@bucket` as a bucket name, outside the URI that redact
    masked: the secret reached the error line."""
    uri = "s3://AKIAEXAMPLE:wJalrXUtnFEMIsecret@my-bucket/priors/church"
    with pytest.raises(ModelLoadError) as error:
        sdedit.load(uri, storage_options={"endpoint_url": "http://127.0.0.1:9"})
    message = str(error.value)
    assert message.startswith("model s3://AKIAEXAMPLE:***@my-bucket/priors/church: could not")
    assert 'Invalid bucket name "AKIAEXAMPLE:***@my-bucket"' in message
    assert "wJalrXUtnFEMIsecret" not in message


def test_a_web_folder_that_cannot_be_read_is_a_model_error_without_credentials(
        web_root, ddpm_folder, tmp_path, monkeypatch):
    """A file the server lists but does not serve, behind a URI with a password: a
    ModelLoadError naming the URI with the password masked, a one-line error from `sdedit
    edit`, and a storage failure (one line, no password) from `sdedit run`."""
    from click.testing import CliRunner
    from PIL import Image

    from pipeline.cli import main
    from tasks.images import StorageError, storage_step

    monkeypatch.setenv("SDEDIT_CACHE", str(tmp_path / "cache"))
    root, base = web_root
    folder, _ = ddpm_folder
    served = copy_folder(folder, root / "broken")
    (served / "scheduler_config.json").unlink()
    (served / "scheduler_config.json").symlink_to(tmp_path / "nowhere")  # listed, then a 404
    uri = base.replace("http://", "http://alice:s3cr3t@") + "/broken/"
    shown = base.replace("http://", "http://alice:***@") + "/broken/"
    with pytest.raises(ModelLoadError) as caught:
        sdedit.load(uri, device="cpu")
    message = str(caught.value)
    assert message.startswith(f"model {shown}: could not ")
    assert "scheduler_config.json" in message and "FileNotFoundError" in message
    assert "s3cr3t" not in message
    with pytest.raises(StorageError) as stopped, storage_step("cannot read model"):
        describe(uri)
    assert str(stopped.value).startswith(f"cannot read model: ModelFetchError: model {shown}")
    assert "s3cr3t" not in str(stopped.value)
    guide = tmp_path / "g.png"
    Image.new("RGB", (32, 32)).save(guide)
    result = CliRunner().invoke(main, ["edit", "--model", uri, "--guide", str(guide),
                                       "--out", str(tmp_path / "o.png")],
                                catch_exceptions=False)
    assert result.exit_code == 1
    assert result.output.startswith(f"Error: cannot load model {shown}: ")
    assert "scheduler_config.json" in result.output and "s3cr3t" not in result.output


def test_an_unreachable_model_server_stops_a_run_with_one_line(closed_port, tmp_path):
    """As before model fetch failures became ModelLoadErrors: `sdedit run` names the model
    and what the store answered, in one line without the password."""
    from click.testing import CliRunner

    from pipeline.cli import main

    manifest = os.path.join(os.path.dirname(__file__), "..", "..", "pipeline", "examples",
                            "manifest.parquet")
    uri = f"http://alice:s3cr3t@127.0.0.1:{closed_port}/model/"
    result = CliRunner().invoke(main, ["run", manifest, str(tmp_path / "out"), "--model", uri,
                                       "--dry-run"])
    assert result.exit_code == 1, result.output
    assert result.output.startswith(
        f"Error: cannot read model http://alice:***@127.0.0.1:{closed_port}/model/: ")
    assert "Cannot connect" in result.output and result.output.count("\n") == 1
    assert "s3cr3t" not in result.output and "Traceback" not in result.output


@pytest.mark.parametrize(("text", "shown"), [
    ("http://alice:PW@h:8765/model/", "http://alice:***@h:8765/model/"),
    ("https://TOKEN@github.com/o/r", "https://***@github.com/o/r"),
    ("cannot read model http://a:PW@h/m?token=T&x=1: refused",
     "cannot read model http://a:***@h/m?token=***&x=1: refused"),
    ("https://acct.blob.core.windows.net/c/b?sv=2020&sig=ABC%3D&se=2025",
     "https://acct.blob.core.windows.net/c/b?sv=2020&sig=***&se=2025"),
    ("https://h/x?X-Amz-Credential=AK%2F1&X-Amz-Date=1&X-Amz-Signature=abc",
     "https://h/x?X-Amz-Credential=***&X-Amz-Date=1&X-Amz-Signature=***"),
    ("https://user:p@ss@host/model", "https://user:***@host/model"),
    ("cannot read https://h/a.png?X-Amz-Signature=S1G: HTTP 403",
     "cannot read https://h/a.png?X-Amz-Signature=***: HTTP 403"),
    ("https://h/a?token=a:b:c&x=1", "https://h/a?token=***&x=1"),
    ("s3://bucket/models/church", "s3://bucket/models/church"),
    ("mail bob@example.com about /tmp/a@b", "mail bob@example.com about /tmp/a@b"),
    ("s3://AKIAEX:wJalr/XUtn+FEMI@bucket/m", "s3://AKIAEX:***@bucket/m"),  # '/' in a secret
    ("http://cdn:8080/icons/logo@2x.png", "http://cdn:8080/icons/logo@2x.png"),  # a port
    ('model s3://AKIAEX:wJalrXUtnFEMI@b/m: Invalid bucket name "AKIAEX:wJalrXUtnFEMI@b"',
     'model s3://AKIAEX:***@b/m: Invalid bucket name "AKIAEX:***@b"'),  # echoed by botocore
    ("https://h/a?sig=S1GNATURE: the signature S1GNATURE does not match",
     "https://h/a?sig=***: the signature *** does not match"),
    ("https://u:p%40ssw0rd!x@h/m: login p@ssw0rd!x refused",  # repeated decoded
     "https://u:***@h/m: login *** refused"),
    ("sftp://ubuntu@host/home/ubuntu/m: no /home/ubuntu/m",  # a user name is no secret
     "sftp://***@host/home/ubuntu/m: no /home/ubuntu/m"),
    ("https://h/m?sortkey=unet: could not copy unet/config.json",  # nor a short value
     "https://h/m?sortkey=***: could not copy unet/config.json"),
])
def test_redact_masks_what_uris_carry_as_credentials(text, shown):
    from sdedit.loading import redact

    assert redact(text) == shown


def test_a_priors_repr_is_one_line_not_its_network():
    """The dataclass repr printed the whole UNet twice and all 1000 betas."""
    prior = sdedit.load("builtin:tiny", device="cpu")
    assert repr(prior) == (f"Prior(name='builtin:tiny', schedule=VPSchedule, resolution=64, "
                           f"channels=3, device='cpu', digest={prior.digest[:19]}...)")
