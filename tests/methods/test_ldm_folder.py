"""LDM on the user's images, through the CLI: a folder of PNG and JPEG files, RGB and grayscale,
of different sizes, in two class sub-folders, each image with its caption in a ``.txt`` beside
it. The tiny first stage trains on it, then the byte-level caption LDM (on the files' captions),
the class-conditional LDM (on the sub-folders) and the unconditional one; ``sample --prompts``
draws from the caption model, and data that is not the first stage's input is named."""

import re
import shlex

import pytest
import torch
from PIL import Image

from diffusion_apps.checkpoint import load_module, read_checkpoint
from diffusion_apps.methods import LatentDiffusion
from diffusion_apps.nn import CaptionEncoder
from tests.conftest import CONFIGS, run_cli_in
from tests.factories import randomize_

TINY = CONFIGS / "tiny"
CAPTIONS = {  # the two classes' images, and their captions
    "blue/0.png": "a blue cup",
    "blue/1.jpg": "a blue cup on a table",
    "blue/2.png": "a small blue cup",
    "blue/3.jpeg": "une tasse bleue",
    "blue/4.png": "a blue bowl",
    "blue/5.png": "a blue mug",
    "red/0.png": "a red cup",
    "red/1.jpg": "a red cup on a table",
    "red/2.png": "a small red cup",
    "red/3.jpeg": "une tasse rouge, café",
    "red/4.png": "a red bowl",
    "red/5.png": "",  # the empty caption: the null condition
}
FOLDER = ["--data.init_args.dataset", "folder", "--data.init_args.root", "images",
          "--data.init_args.channels", "3", "--data.init_args.batch_size", "4",
          "--data.init_args.val_fraction", "0.25", "--trainer.max_steps", "2",
          "--trainer.enable_progress_bar", "false"]  # fmt: skip
RGB_STAGE1 = ["--model.init_args.autoencoder.init_args.in_channels", "3",
              "--model.init_args.discriminator.init_args.in_channels", "3"]  # fmt: skip
CAPTIONED = [*FOLDER, "--data.init_args.captions", "true"]
CKPT = "runs/tiny_{}/version_0/checkpoints/last.ckpt"


def make_folder(root) -> None:
    for i, (name, caption) in enumerate(CAPTIONS.items()):
        path = root / "images" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        mode = "L" if i % 3 == 2 else "RGB"
        colour = (200, 30, 30) if name.startswith("red") else (30, 30, 200)
        fill = colour if mode == "RGB" else 90
        fmt = "JPEG" if path.suffix in (".jpg", ".jpeg") else "PNG"
        Image.new(mode, (16 + 3 * i, 24 - i), fill).save(path, format=fmt)
        path.with_suffix(".txt").write_text(f"  {caption}\n", encoding="utf-8")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The folder; the tiny first stage on it (RGB, 16 px), then the byte-level caption LDM,
    two steps each, recording every caption the caption encoder was given."""
    root = tmp_path_factory.mktemp("ldm_folder")
    make_folder(root)
    seen, tokenize = [], CaptionEncoder.tokenize

    def recording(self, captions, device=None):
        seen.extend(captions)
        return tokenize(self, captions, device)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(CaptionEncoder, "tokenize", recording)
        run_cli_in(
            root,
            ["fit", "--config", str(TINY / "ldm_autoencoder.yaml"), *FOLDER, *RGB_STAGE1],
            ["fit", "--config", str(TINY / "ldm_bytes.yaml"), *CAPTIONED],
        )
    return root, seen


def test_the_caption_model_trained_on_the_files_captions(runs):
    root, seen = runs
    assert read_checkpoint(root / CKPT.format("ldm_bytes"))["global_step"] == 2
    # sanity validation, 2 training batches and the validation after them: every caption the
    # encoder read is a file's, exactly (measured digit captions would be "thin upright …")
    assert len(seen) >= 3 * 4 and set(seen) <= set(CAPTIONS.values())
    assert len(set(seen)) > 1


def test_a_caption_context_differs_from_the_null_context(runs):
    model = load_module(runs[0] / CKPT.format("ldm_bytes"), LatentDiffusion)
    ids = model.prompt_ids(["a red cup", ""])
    assert torch.equal(ids[1:], model.null_ids(1))  # the empty caption is ∅
    red, null = model.condition(ids)
    assert not torch.allclose(red, null, atol=1e-4)
    with pytest.warns(UserWarning, match=r"max_len=24 UTF-8 bytes .* \['a red cup on a long"):
        long = model.prompt_ids(["a red cup on a long wooden table"])
    assert torch.equal(long, model.prompt_ids(["a red cup on a long wood"]))  # 24 bytes kept


def test_sample_with_prompts_from_the_trained_checkpoint(runs):
    root, _ = runs
    run_cli_in(
        root,
        ["sample", "--ckpt_path", CKPT.format("ldm_bytes"), "--num_samples", "2", "--steps",
         "2", "--prompts", "[a red cup, une tasse bleue]", "--out_dir", "drawn", "--device",
         "cpu"],
    )  # fmt: skip
    for i in range(2):
        with Image.open(root / f"drawn/00000{i}.png") as image:
            assert (image.mode, image.size) == ("RGB", (16, 16))
    model = load_module(root / CKPT.format("ldm_bytes"), LatentDiffusion)
    randomize_(model.unet, 0.1, seed=1)  # 2 steps leave the cross-attention's output near 0
    a, b = (model.sample(1, prompts=[p], steps=2, generator=torch.Generator().manual_seed(0))
            for p in ("a red cup", "a blue cup"))  # fmt: skip
    assert a.shape == (1, 3, 16, 16) and not torch.equal(a, b)
    with pytest.raises(ValueError, match=r"takes no labels \(it takes prompts\)"):
        model.sample(1, labels=[3])
    with pytest.raises(SystemExit, match="--labels: LatentDiffusion takes --prompts"):
        run_cli_in(root, ["sample", "--ckpt_path", CKPT.format("ldm_bytes"), "--labels", "3"])


def test_class_conditional_and_unconditional_ldms_train_on_the_folder(runs):
    root, _ = runs
    plain = root / "unconditional.yaml"  # no condition, no cross-attention
    plain.write_text(
        "model: {init_args: {condition: null, unet: {init_args: {context_dim: null}}}}"
    )
    unconditional = ["--config", str(plain), "--trainer.logger.init_args.name", "tiny_ldm_plain"]
    run_cli_in(
        root,
        ["fit", "--config", str(TINY / "ldm.yaml"), *FOLDER,
         "--model.init_args.condition.init_args.num_classes", "2"],
        ["fit", "--config", str(TINY / "ldm.yaml"), *FOLDER, *unconditional],
    )  # fmt: skip
    classes = load_module(root / CKPT.format("ldm"), LatentDiffusion)
    assert classes.condition.num_classes == 2 and classes.generation.num_classes == 2
    assert classes.sample(2, labels=[0, 1], steps=2).shape == (2, 3, 16, 16)
    plain = load_module(root / CKPT.format("ldm_plain"), LatentDiffusion)
    assert plain.condition is None and plain.sample(2, steps=2).shape == (2, 3, 16, 16)


@pytest.mark.parametrize(
    "data, named",
    [
        (["--data.init_args.image_size", "32"], "3-channel 32px images but the first stage"),
        (["--data.init_args.channels", "1"], "1-channel 16px images but the first stage"),
    ],
    ids=["image_size", "channels"],
)
def test_data_that_is_not_the_first_stages_input_is_named(runs, data, named):
    with pytest.raises(SystemExit, match=rf"{named} \S+ takes 3-channel 16px"):
        run_cli_in(runs[0], ["fit", "--config", str(TINY / "ldm_bytes.yaml"), *CAPTIONED, *data])


@pytest.mark.parametrize(
    "config, extra, named",
    [
        ("ldm_bytes", FOLDER, "needs captions, and dataset=.folder. gives none"),
        ("ldm", CAPTIONED, "the data gives captions but this LDM's condition is ClassEmbedder"),
    ],
    ids=["caption-model-without-captions", "captions-for-a-class-model"],
)
def test_captions_and_condition_must_agree(runs, config, extra, named):
    with pytest.raises(SystemExit, match=named):
        run_cli_in(runs[0], ["fit", "--config", str(TINY / f"{config}.yaml"), *extra])


def header_commands(config) -> list[list[str]]:
    """The ``python -m diffusion_apps`` commands of a config's header comment, as arguments."""
    text = re.sub(r"\\\n#\s*", " ", config.read_text())  # join the continued lines
    start = "#   python -m diffusion_apps "
    return [shlex.split(line.removeprefix(start)) for line in text.splitlines()
            if line.startswith(start)]  # fmt: skip


def test_the_folder_configs_commands_run(runs):
    """configs/ldm_folder.yaml's own commands (stage 1 on the folder, stage 2, sample with
    prompts) at their real sizes, one step each, on the test's folder."""
    root, _ = runs
    paths = {"my_images/": "images"} | {
        f"configs/{name}.yaml": str(CONFIGS / f"{name}.yaml")
        for name in ("ldm_autoencoder", "ldm_folder")
    }
    stage1, stage2, sample = (
        [paths.get(arg, arg) for arg in command]
        for command in header_commands(CONFIGS / "ldm_folder.yaml")[:3]
    )
    quick = ["--trainer.max_steps", "1", "--trainer.limit_val_batches", "0",
             "--data.init_args.batch_size", "4", "--data.init_args.num_workers", "0"]  # fmt: skip
    run_cli_in(
        root,
        [*stage1, *quick],
        [*stage2, *quick],
        [*sample, "--num_samples", "2", "--steps", "2", "--out_dir", "prompted"],
    )
    model = load_module(root / "runs/ldm_folder/version_0/checkpoints/last.ckpt", LatentDiffusion)
    assert model.byte_captions and model.first_stage.sample_shape == (3, 64, 64)
    with Image.open(root / "prompted/000001.png") as image:
        assert (image.mode, image.size) == ("RGB", (64, 64))
