"""MVD: the masked pretexts (MAE, VideoMAE, masked video distillation) and the `mvd` fine-tuning method.

Unit checks on tiny random clips (the loss by hand, what the encoder, the teachers and the decoders
see), then end to end on real encoded synthetic videos through prep, `vidistill teach --pretext
mae|videomae|mvd` (held-out reconstruction loss falls, resume is exact) and `vidistill distill --method
mvd` (evaluated and exported with ONNX parity like every student).
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from vidistill import cli, stages
from vidistill.config import ConfigError, DistillConfig, ExportConfig, PrepConfig, SynthConfig, TeachConfig, TrainConfig
from vidistill.data import ClipDataset
from vidistill.data.pool import FrameClips, unlabelled_pool
from vidistill.distill import DistillContext, create_distiller, get_method, method_params
from vidistill.models import create_model
from vidistill.models.masking import tube_mask
from vidistill.train import fit, load_model, save_model
from vidistill.train.loop import load_checkpoint
from vidistill.train.pretext import MaskedPixels, MaskedVideoDistillation, masked_feature_loss, pixel_targets

K, T, S = 3, 4, 32  # grid (2, 4, 4): 16 tokens per slice, int(0.9 * 16) = 14 masked


def _vit(name, seed, **kw):
    torch.manual_seed(seed)
    return create_model(name, num_classes=K, frames=T, size=S, **kw)


def _clips(n=4, seed=0):
    return torch.rand(n, 3, T, S, S, generator=torch.Generator().manual_seed(seed))


def _mvd(teachers="both", **kw):
    image = _vit("vit_image_tiny", 1) if teachers in ("both", "image") else None
    video = _vit("vit_video_tiny", 2) if teachers in ("both", "video") else None
    return MaskedVideoDistillation(_vit("vit_video_tiny", 3), image_teacher=image, video_teacher=video, **kw)


# ----------------------------------------------------------------------------------------------
# the loss


def test_smooth_l1_by_hand_on_two_masked_tokens():
    mask = torch.tensor([[True, False, True]])  # tokens 0 and 2 masked
    pred = torch.tensor([[[0.5, 2.0], [-1.5, 0.2]]])  # (1, 2 masked, 2)
    targets = torch.tensor([[[0.0, 0.0], [9.0, 9.0], [0.0, 0.0]]])  # the visible token's target is ignored
    # |d| < 1: 0.5 d^2, else |d| - 0.5  ->  0.125, 1.5, 1.0, 0.02; mean over the 4 numbers
    assert float(masked_feature_loss(pred, targets, mask)) == pytest.approx((0.125 + 1.5 + 1.0 + 0.02) / 4, abs=1e-7)
    task = _mvd(image_weight=1.0, video_weight=1.0)
    with torch.no_grad():
        out = task.losses(_clips(), tube_mask(4, (2, 4, 4), 0.9, generator=torch.Generator().manual_seed(0)))
    assert float(out["loss"]) == pytest.approx(float(out["feat_image"]) + float(out["feat_video"]), rel=1e-6)
    with torch.no_grad():
        half = _mvd(image_weight=0.5, video_weight=2.0).losses(_clips(), tube_mask(4, (2, 4, 4), 0.9, generator=torch.Generator().manual_seed(0)))
    assert float(half["loss"]) == pytest.approx(0.5 * float(half["feat_image"]) + 2.0 * float(half["feat_video"]), rel=1e-6)


@pytest.mark.parametrize("teacher", ["image", "video"])
def test_the_loss_ignores_targets_at_visible_positions(teacher):
    """A teacher target perturbed at a visible position leaves the loss unchanged (1e-7); at a masked one it changes."""
    task = _mvd().eval()
    x = _clips()
    mask = tube_mask(4, (2, 4, 4), 0.9, generator=torch.Generator().manual_seed(3))
    base = float(task.losses(x, mask)["loss"])
    offset = 1 if teacher == "image" else 0  # the image teacher's blocks also carry its CLS token

    def perturbed(position):
        def hook(module, args, out):  # row 0: sample 0 (for the image teacher, the frame of its first tubelet)
            out = out.clone()
            out[0, position + offset] += 5.0
            return out

        handle = task.teachers[teacher].blocks.register_forward_hook(hook)
        try:
            return float(task.losses(x, mask)["loss"])
        finally:
            handle.remove()

    slice0 = mask[0, :16]
    visible, masked = int((~slice0).nonzero()[0]), int(slice0.nonzero()[0])
    assert abs(perturbed(visible) - base) <= 1e-7
    assert abs(perturbed(masked) - base) > 1e-4


# ----------------------------------------------------------------------------------------------
# what each part sees


def test_the_encoder_receives_only_the_visible_tokens_of_a_tube_mask():
    task = _mvd()
    seen = {}
    task.student.blocks.register_forward_pre_hook(lambda m, args: seen.setdefault("tokens", args[0].detach().clone()))
    x = _clips()
    torch.manual_seed(11)
    task.train()
    task({"rgb": x})
    torch.manual_seed(11)
    mask = task.make_mask(4)  # the mask of that step (the global RNG)
    assert torch.equal(mask.view(4, 2, 16), mask.view(4, 2, 16)[:, :1].expand(4, 2, 16))
    assert (mask.view(4, 2, 16).sum(-1) == 14).all()
    s = task.student
    all_tokens = s.patch_embed(s.normalize(x)).flatten(2).transpose(1, 2) + s.pos_embed  # (B, 32, D)
    assert seen["tokens"].shape == (4, 4, 96)  # 2 visible per slice x 2 slices
    torch.testing.assert_close(seen["tokens"], all_tokens[~mask].view(4, 4, 96))


def test_the_teachers_receive_the_unmasked_clip_and_the_image_teacher_the_first_frame_of_each_tubelet():
    task = _mvd()
    seen = {}
    for name in ("image", "video"):
        teacher = task.teachers[name]
        teacher.patch_embed.register_forward_pre_hook(lambda m, a, name=name: seen.setdefault(name, a[0].clone()))
    x = _clips()
    task.train()
    task({"rgb": x})
    norm = task.teachers["video"].normalize
    torch.testing.assert_close(seen["video"], norm(x))  # the whole clip, nothing masked
    frames = x[:, :, ::2].transpose(1, 2).flatten(0, 1)  # (B·t, 3, H, W): frames 0 and 2
    torch.testing.assert_close(seen["image"], task.teachers["image"].normalize(frames))


def test_image_targets_at_token_t_i_j_are_the_image_teachers_tokens_of_frame_2t_before_its_final_norm():
    task = _mvd().eval()
    x = _clips(2)  # every frame different
    targets = task.image_targets(x)  # (B, t·h·w, D)
    teacher = task.teachers["image"]
    for t in range(2):
        want = teacher.forward_tokens(x[:, :, 2 * t], final_norm=False)  # (B, 16, D)
        torch.testing.assert_close(targets[:, 16 * t: 16 * (t + 1)], want)
        assert not torch.allclose(targets[:, 16 * t: 16 * (t + 1)], teacher.forward_tokens(x[:, :, 2 * t]), atol=1e-3)
    odd = x.clone()
    odd[:, :, 1::2] = torch.rand_like(odd[:, :, 1::2])  # frames 2t+1 are not used
    torch.testing.assert_close(task.image_targets(odd), targets)
    video = task.video_targets(x)
    torch.testing.assert_close(video, task.teachers["video"].forward_tokens(x, final_norm=False))


def test_the_two_decoders_share_no_parameter_and_give_different_outputs():
    task = _mvd()
    img, vid = task.decoders["image"], task.decoders["video"]
    assert not {id(p) for p in img.parameters()} & {id(p) for p in vid.parameters()}
    assert img.mask_token is not vid.mask_token
    mask = tube_mask(2, (2, 4, 4), 0.9, generator=torch.Generator().manual_seed(0))
    visible = torch.randn(2, 4, 96)
    assert not torch.allclose(img(visible, mask), vid(visible, mask), atol=1e-3)
    assert len(img.blocks) == len(vid.blocks) == 2


def test_single_teacher_arms_have_one_decoder_and_one_term():
    for teachers in ("image", "video"):
        task = _mvd(teachers)
        out = task.losses(_clips(), task.make_mask(4))
        assert list(task.decoders) == [teachers] and set(out) == {"loss", f"feat_{teachers}"}


class _Clips(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        return {"rgb": _clips(1, seed=i)[0], "label": 0, "index": i, "video_id": i}


def test_teachers_stay_frozen_in_eval_mode_and_out_of_the_checkpoint(tmp_path):
    task = _mvd()
    before = {k: v.clone() for k, v in task.teachers.state_dict().items()}
    modes = []
    for teacher in task.teachers.values():
        teacher.blocks.register_forward_pre_hook(lambda m, a, t=teacher: modes.append(t.training))
    fit(task, _Clips(), TrainConfig(epochs=1, batch_size=4, lr=0.01, warmup_epochs=0, device="cpu"), tmp_path, progress=False)
    assert modes and not any(modes)
    for k, v in task.teachers.state_dict().items():
        assert torch.equal(v, before[k]), f"teacher weight {k} changed"
    assert not any(p.requires_grad for p in task.teachers.parameters())
    assert not {id(p) for p in task.trainable_parameters()} & {id(p) for p in task.teachers.parameters()}
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert not any(k.startswith("teachers.") for k in ckpt["task"]) and any(k.startswith("decoders.video.") for k in ckpt["task"])


def test_misaligned_teachers_are_refused():
    student = _vit("vit_video_tiny", 0)
    torch.manual_seed(0)
    coarse = create_model("vit_image_tiny", num_classes=K, size=S, patch=(16, 16))
    with pytest.raises(ConfigError, match="does not line up"):
        MaskedVideoDistillation(student, image_teacher=coarse, video_teacher=None)
    with pytest.raises(ConfigError, match="must be an image ViT"):
        MaskedVideoDistillation(student, image_teacher=_vit("vit_video_tiny", 1), video_teacher=None)


# ----------------------------------------------------------------------------------------------
# pixel targets (MAE / VideoMAE)


def test_pixel_targets_are_patches_normalised_like_mae_and_videomae():
    img = torch.rand(2, 3, 16, 16)
    rows = pixel_targets(img, (8, 8))  # MAE: (p, q, c) order, normalised over all 192 values
    patch = img[1, :, 8:16, 0:8].permute(1, 2, 0).reshape(-1)  # token (1, 0) of sample 1
    torch.testing.assert_close(rows[1, 2], (patch - patch.mean()) / (patch.var() + 1e-6).sqrt())
    clip = torch.rand(2, 3, 4, 16, 16)
    cells = pixel_targets(clip, (2, 8, 8))  # VideoMAE: ((p0 p1 p2) c), normalised per channel
    tube = clip[0, :, 2:4, 0:8, 8:16].permute(1, 2, 3, 0).reshape(-1, 3)  # token (1, 0, 1) = index 4 + 1
    want = (tube - tube.mean(0)) / (tube.var(0).sqrt() + 1e-6)
    torch.testing.assert_close(cells[0, 5], want.reshape(-1))
    assert cells.shape == (2, 8, 2 * 8 * 8 * 3)


def test_masked_pixel_task_masks_by_kind_and_scores_only_masked_patches():
    mae = MaskedPixels(_vit("vit_image_tiny", 0), mask_ratio=0.75)
    assert (mae.make_mask(5).sum(1) == 12).all()  # random: int(0.75 · 16)
    vmae = MaskedPixels(_vit("vit_video_tiny", 0), mask_ratio=0.9)
    m = vmae.make_mask(5).view(5, 2, 16)
    assert torch.equal(m[:, 0], m[:, 1]) and (m.sum(-1) == 14).all()  # tube
    x = _clips(2)
    mask = vmae.make_mask(2)
    base = float(vmae.losses(x, mask)["loss"])
    y = x.clone()  # change the pixels of a visible tubelet: its own target is not scored, but it is
    col = int((~mask[0, :16]).nonzero()[0])  # an encoder input, so the loss changes; the masked target moves too
    i, j = divmod(col, 4)
    y[0, :, 0:2, 8 * i:8 * i + 8, 8 * j:8 * j + 8] = torch.rand(3, 2, 8, 8)
    assert float(vmae.losses(y, mask)["loss"]) != base
    assert {"loss", "pixel_mse"} == set(vmae.losses(x, mask))


# ----------------------------------------------------------------------------------------------
# end to end on real encoded videos


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("mvd")
    synth = SynthConfig(out=str(root / "raw"), videos_per_class=4, frames=12, width=48, height=36, seed=0)
    prep = PrepConfig(dataset="synthetic", root=synth.out, out=str(root / "clips"), frames=T, stride=2, short_side=S,
                      crop=S, synth=synth)
    stages.prep(prep, progress=False, track=False)
    return {"root": root, "clips": prep.out}


def _train(**kw):
    return TrainConfig(**{"epochs": 4, "batch_size": 8, "lr": 3e-3, "warmup_epochs": 1, "weight_decay": 0.05,
                          "betas": [0.9, 0.95], "device": "cpu", **kw})


@pytest.fixture(scope="module")
def pretrained(data):
    """`teach --pretext mae`, `--pretext videomae`, then `--pretext mvd` from those two teachers."""
    out = {}
    for pretext, model in (("mae", "vit_image_tiny"), ("videomae", "vit_video_tiny")):
        cfg = TeachConfig(clips=data["clips"], out=str(data["root"] / pretext), model=model, pretext=pretext, train=_train())
        cfg.validate()
        out[pretext] = stages.teach(cfg, progress=False, track=False)
    cfg = TeachConfig(clips=data["clips"], out=str(data["root"] / "mvd"), model="vit_video_tiny", pretext="mvd",
                      image_teacher=out["mae"]["model"], video_teacher=out["videomae"]["model"], train=_train())
    cfg.validate()
    out["mvd"] = stages.teach(cfg, progress=False, track=False)
    return out


@pytest.mark.parametrize("pretext", ["mae", "videomae", "mvd"])
def test_held_out_reconstruction_loss_falls_and_models_carry_their_pretext(pretrained, pretext):
    result = pretrained[pretext]
    assert result["heldout_loss"] < 0.9 * result["heldout_loss_init"], result
    metrics = json.loads((Path(result["out"]) / "eval" / "metrics.json").read_text())
    assert metrics["heldout_loss"] == pytest.approx(result["heldout_loss"]) and "top1" not in metrics
    model, info = load_model(result["model"])
    assert info["extra"]["pretext"] == pretext and info["extra"]["mask_ratio"] == (0.75 if pretext == "mae" else 0.9)
    assert model.input_kind == ("image" if pretext == "mae" else "video")
    history = json.loads((Path(result["out"]) / "history.json").read_text())
    assert "train_acc" not in history[-1] and "heldout_loss" in history[-1]


def test_frames_get_the_same_view_as_one_frame_clips():
    """MAE's batches are frames `(B, 3, H, W)`: a view crops and flips them as it would one-frame clips."""
    from vidistill.data.augment import apply_views, augment_batch, sample_views

    frames = torch.rand(6, 3, S, S, generator=torch.Generator().manual_seed(0))
    out = augment_batch({"rgb": frames, "label": torch.zeros(6, dtype=torch.long)}, torch.Generator().manual_seed(1),
                        hflip=True, crop_scale=0.2)
    views = sample_views(6, torch.Generator().manual_seed(1), hflip=True, crop_scale=0.2)
    assert out["rgb"].shape == frames.shape
    torch.testing.assert_close(out["rgb"], apply_views(frames.unsqueeze(2), views).squeeze(2))
    assert not torch.equal(out["rgb"], frames)


@pytest.mark.parametrize("section", ["image_teacher", "video_teacher", "student"])
def test_every_pretext_of_params_yaml_trains_on_the_releases_views(section, data, pretrained, tmp_path, monkeypatch):
    """Issue 26: params.yaml's `mvd_pretrain` pretexts train with the releases' views (`PRETEXT_VIEWS`): MAE random
    resized crops from 20 % of the area and flips; VideoMAE's and MVD's multi-scale crops, no flip. One epoch of
    each, on the section's own settings, with every training batch's view recorded."""
    import vidistill.train.loop as loop
    from vidistill.config import load_params
    from vidistill.schema import from_dict
    from vidistill.train.pretext import PRETEXT_VIEWS

    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml")["mvd_pretrain"][section]
    cfg = from_dict(TeachConfig, params, where=f"mvd_pretrain.{section}.")
    assert {"hflip": cfg.train.hflip, "crop_scale": cfg.train.crop_scale} == PRETEXT_VIEWS[cfg.pretext]
    cfg = replace(cfg, clips=data["clips"], out=str(tmp_path / section), image_teacher=pretrained["mae"]["model"],
                  video_teacher=pretrained["videomae"]["model"],
                  train=replace(cfg.train, epochs=1, warmup_epochs=0, batch_size=8, device="cpu"))
    seen = []
    real_augment = loop.augment_batch

    def spy(batch, generator, **kw):
        out = real_augment(batch, generator, **kw)
        seen.append((kw["hflip"], kw["crop_scale"], tuple(batch["rgb"].shape), bool(torch.equal(out["rgb"], batch["rgb"]))))
        return out

    monkeypatch.setattr(loop, "augment_batch", spy)
    r = stages.teach(cfg, progress=False, track=False)
    assert math.isfinite(r["heldout_loss"])
    want = PRETEXT_VIEWS[cfg.pretext]
    assert seen and all((h, c) == (want["hflip"], want["crop_scale"]) for h, c, _, _ in seen)
    assert all(len(shape) == (4 if cfg.pretext == "mae" else 5) for _, _, shape, _ in seen)
    assert not any(same for *_, same in seen)  # the views changed every batch


def test_the_release_decoders_scaled_to_our_widths_and_the_videomae_small_data_recipe(data, tmp_path):
    """Issue 26: `teach.recipe: release` builds each pretext's release decoder scaled to the encoder (MAE 8 x 2/3,
    VideoMAE 4 x 1/2, MVD 2 x 1); `small_data` is VideoMAE's UCF101 recipe, tube masking 0.75 with its 4-block
    decoder. Checked by hand for our 96-wide, 3-head ViTs and on a real one-epoch run."""
    from vidistill.train.pretext import recipe_decoder

    assert recipe_decoder("mae", 96, 3) == (8, 64, 2)  # 512/768 of the width, 16 heads of 32 -> 2 of 32
    assert recipe_decoder("videomae", 96, 3) == (4, 48, 2)
    assert recipe_decoder("mvd", 96, 3) == (2, 96, 3)
    assert recipe_decoder("videomae", 768, 12) == (4, 384, 6)  # the release's own numbers back
    assert recipe_decoder("mae", 768, 12)[:2] == (8, 512)
    cfg = TeachConfig(clips=data["clips"], out=str(tmp_path / "small"), model="vit_video_tiny", pretext="videomae",
                      recipe="small_data", train=_train(epochs=1, warmup_epochs=0))
    cfg.validate()
    assert cfg.mask_ratio == 0.75
    r = stages.teach(cfg, progress=False, track=False)
    _, info = load_model(r["model"])
    assert info["extra"]["decoder"] == [4, 48, 2] and info["extra"]["mask_ratio"] == 0.75
    assert info["extra"]["recipe"] == "small_data"
    for bad, match in (({"pretext": "mae", "model": "vit_image_tiny", "recipe": "small_data"}, "is VideoMAE's"),
                       ({"pretext": "none", "recipe": "release"}, "is for the masked pretexts"),
                       ({"pretext": "mvd", "recipe": "big"}, "recipe must be one of")):
        with pytest.raises(ConfigError, match=match):
            TeachConfig(**bad).validate()


def test_the_pool_is_the_train_split_and_a_test_video_in_it_is_refused(data, tmp_path):
    pool = unlabelled_pool(data["clips"])
    test = ClipDataset(data["clips"], "test")
    assert pool.split == "train" and not set(pool.video_ids) & set(test.video_ids)
    fixed, drawn = FrameClips(pool, random_frame=False), FrameClips(pool, random_frame=True)
    assert len(fixed) == len(drawn) == len(pool) and fixed[5]["rgb"].shape == (3, S, S)
    torch.testing.assert_close(fixed[5]["rgb"], pool[5]["rgb"][:, 5 % T])
    torch.manual_seed(0)
    frames = [drawn[1]["rgb"] for _ in range(12)]  # one draw each
    shown = {next(t for t in range(T) if torch.equal(f, pool[1]["rgb"][:, t])) for f in frames}
    assert len(shown) > 1  # a random frame at each access
    leaky = tmp_path / "leaky"
    shutil.copytree(data["clips"], leaky)
    index = json.loads((leaky / "train" / "index.json").read_text())
    index[0]["video"] = json.loads((leaky / "test" / "index.json").read_text())[0]["video"]
    (leaky / "train" / "index.json").write_text(json.dumps(index))
    with pytest.raises(ConfigError, match="shares 1 video.*transductive"):
        unlabelled_pool(leaky)
    cfg = TeachConfig(clips=str(leaky), out=str(tmp_path / "out"), model="vit_video_tiny", pretext="videomae", train=_train())
    with pytest.raises(ConfigError, match="transductive"):
        stages.teach(cfg, progress=False, track=False)
    assert not (tmp_path / "out").exists()


def test_mvd_refuses_teachers_of_another_pretext_in_one_line(data, pretrained, tmp_path, capsys):
    common = ["teach", "--clips", data["clips"], "--model", "vit_video_tiny", "--pretext", "mvd", "--epochs", "1",
              "--device", "cpu", "--no-track", "--quiet", "--params", str(tmp_path / "none.yaml")]
    swapped = ["--image-teacher", pretrained["videomae"]["model"], "--video-teacher", pretrained["videomae"]["model"]]
    assert cli.main([*common, "--out", str(tmp_path / "a"), *swapped]) == 2
    err = capsys.readouterr().err
    assert "was pre-trained by 'videomae', not 'mae'" in err and len(err.strip().splitlines()) == 1, err
    supervised = tmp_path / "supervised.pt"
    torch.manual_seed(0)
    save_model(supervised, create_model("vit_video_tiny", num_classes=K, frames=T, size=S), classes=list("abc"),
               extra={"modality": "rgb"})
    assert cli.main([*common, "--out", str(tmp_path / "b"), "--image-teacher", pretrained["mae"]["model"],
                     "--video-teacher", str(supervised)]) == 2
    err = capsys.readouterr().err
    assert "was pre-trained by 'none', not 'videomae'" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_masked_pretext_resumes_to_the_same_weights(data, tmp_path):
    def run(out, **kw):  # masks come from the global RNG, which the checkpoint restores
        cfg = TeachConfig(clips=data["clips"], out=str(out), model="vit_video_tiny", pretext="videomae", resume=True,
                          train=_train(epochs=2))
        cfg.validate()
        return stages.teach(cfg, progress=False, track=False, **kw)

    full = run(tmp_path / "full")
    run(tmp_path / "part", stop_after_epochs=1)
    resumed = run(tmp_path / "part")
    a, _ = load_model(full["model"])
    b, _ = load_model(resumed["model"])
    for (k, v), w in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(v, w, rtol=0, atol=0, msg=f"{k} differs after resume")
    assert resumed["heldout_loss"] == full["heldout_loss"]


def test_distill_mvd_fine_tunes_the_encoder_with_a_new_head_and_exports_with_parity(data, pretrained, tmp_path, capsys):
    out = tmp_path / "mvd"
    assert cli.main(["distill", "--method", "mvd", "--clips", data["clips"], "--mvd-encoder", pretrained["mvd"]["model"],
                     "--out", str(out), "--epochs", "2", "--batch-size", "8", "--device", "cpu", "--quiet", "--no-track",
                     "--params", str(tmp_path / "none.yaml")]) == 0
    assert "distill (mvd): top1" in capsys.readouterr().out
    model, info = load_model(out / "model.pt")
    assert info["name"] == "vit_video_tiny" and info["extra"]["method"] == "mvd"
    assert not any(k.startswith("decoder") for k in load_checkpoint(out / "checkpoints" / "last.pt")["task"])
    result = stages.export(ExportConfig(model=str(out / "model.pt"), clips=data["clips"]), track=False)
    assert result["parity"]["passed"] and result["parity"]["top1_agreement"] == 1.0


def test_the_fine_tuned_student_starts_from_the_encoder_not_its_head(data, pretrained):
    train = ClipDataset(data["clips"], "train")
    ctx = DistillContext(num_classes=train.num_classes, classes=train.classes, frames=T, size=S,
                         mvd_encoder=pretrained["mvd"]["model"])
    cls = get_method("mvd")
    params = cls.Params()
    torch.manual_seed(123)  # another initialisation than the pre-trained model's
    task = cls(cls.build_student(params, ctx, default="r2plus1d_student"), params, ctx)
    torch.manual_seed(123)
    fresh = cls.build_student(params, ctx, default="r2plus1d_student").state_dict()
    source, _ = load_model(pretrained["mvd"]["model"])
    for k, v in source.state_dict().items():
        if k.startswith("head."):  # re-initialised: the fresh model's (both biases start at zero)
            assert torch.equal(task.student.state_dict()[k], fresh[k]), k
        elif k.startswith("norm."):  # fc_norm (the default): the pre-trained final LayerNorm is dropped
            assert k not in task.student.state_dict()
        else:
            assert torch.equal(task.student.state_dict()[k], v), f"{k} was not loaded"
    assert not torch.equal(fresh["head.weight"], source.state_dict()["head.weight"])  # so the check above can fail
    assert task.fresh == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
    assert type(task.student).__name__ == "VisionTransformer"


def test_fine_tuning_with_fc_norm_as_the_release_and_with_the_final_norm(data, pretrained):
    """Issue 26: the release's fine-tuning head (`modeling_finetune.py`, `use_mean_pooling`): the mean of the last
    block's tokens, a new LayerNorm `fc_norm`, the head at 0.001 of its initialisation; `head: final_norm` keeps
    the pre-trained final LayerNorm on every token (the reading before)."""
    train = ClipDataset(data["clips"], "train")
    ctx = DistillContext(num_classes=train.num_classes, classes=train.classes, frames=T, size=S,
                         mvd_encoder=pretrained["mvd"]["model"])
    cls = get_method("mvd")
    x = _clips(3)
    source, _ = load_model(pretrained["mvd"]["model"])
    with torch.no_grad():
        last_block = source.forward_tokens(x, final_norm=False)  # (B, N, D)
        mean = last_block.mean(1)
        for head in ("fc_norm", "final_norm"):
            params = method_params("mvd", {"head": head})
            torch.manual_seed(0)
            task = cls(cls.build_student(params, ctx, default="r2plus1d_student"), params, ctx)
            student = task.student.eval()
            logits, features = student(x)
            if head == "fc_norm":
                ln = student.fc_norm
                want = torch.nn.functional.layer_norm(mean, (mean.shape[1],), ln.weight, ln.bias, ln.eps)
                torch.testing.assert_close(features, want, rtol=1e-5, atol=1e-5)
                assert torch.equal(ln.weight, torch.ones_like(ln.weight))  # new, not copied
                torch.manual_seed(0)
                plain = create_model("vit_video_tiny", num_classes=train.num_classes, frames=T, size=S, pool="fc_norm")
                torch.testing.assert_close(student.head.weight, 0.001 * plain.head.weight)
            else:
                torch.testing.assert_close(features, source.forward_tokens(x).mean(1), rtol=1e-5, atol=1e-5)
                assert student.fc_norm is None
            torch.testing.assert_close(logits, student.head(features))
    with pytest.raises(ConfigError, match="head must be one of fc_norm, final_norm"):
        method_params("mvd", {"head": "cls"})


def test_fine_tuning_refuses_an_encoder_of_the_wrong_pretext_and_scratch_needs_none(data, pretrained):
    train = ClipDataset(data["clips"], "train")
    ctx = DistillContext(num_classes=train.num_classes, classes=train.classes, frames=T, size=S,
                         mvd_encoder=pretrained["videomae"]["model"])
    student = create_model("vit_video_tiny", num_classes=train.num_classes, frames=T, size=S)
    with pytest.raises(ConfigError, match="was pre-trained by 'videomae', not 'mvd'"):
        create_distiller("mvd", student, ctx)
    create_distiller("mvd", student, ctx, {"init": "videomae"})  # the VideoMAE baseline arm
    ctx.mvd_encoder = ""
    with pytest.raises(ConfigError, match="needs mvd_encoder: pass --mvd-encoder"):
        create_distiller("mvd", student, ctx)
    assert create_distiller("mvd", student, ctx, {"init": "scratch"}).fresh == []
    with pytest.raises(ConfigError, match="init must be one of mvd, videomae, scratch"):
        create_distiller("mvd", student, ctx, {"init": "mae"})


def test_masked_pretext_parameters_are_checked():
    for kw, message in (({"pretext": "mae", "mask_ratio": 1.5}, "teach.mask_ratio must be in"),
                        ({"pretext": "mvd", "mvd_teachers": "three"}, "teach.mvd_teachers must be one of"),
                        ({"pretext": "videomae", "modality": "flow"}, "trains an RGB ViT"),
                        ({"pretext": "mvd", "decoder_depth": 0}, "decoder_depth must be >= 1"),
                        ({"pretext": "mae", "train": TrainConfig(betas=[0.9])}, "betas must be two numbers")):
        with pytest.raises(ConfigError, match=message):
            TeachConfig(model="vit_video_tiny", **kw).validate()
    cfg = TeachConfig(model="vit_video_tiny", pretext="mvd")
    cfg.validate()
    assert cfg.mask_ratio == 0.9 and TeachConfig(model="vit_image_tiny", pretext="mae").mask_ratio == 0.0


# ----------------------------------------------------------------------------------------------
# the pipeline's pre-training stages (Kubeflow component, called in-process on real artifacts; dvc.yaml)


def test_the_pipeline_stage_is_a_marker_unless_a_method_of_the_fan_out_needs_the_encoder(data, tmp_path, monkeypatch):
    """`method_pretrain_op`'s own function on real kfp artifacts: with no method that needs `mvd_encoder`
    it writes only a marker (no training, no MLflow run); with `mvd` in the fan-out it trains the stage
    (here the MAE image teacher, 1 epoch) and records its held-out loss."""
    from kfp import dsl

    from vidistill.distill import list_methods
    from vidistill_pipeline.components import method_pretrain_op

    fn = method_pretrain_op.python_func
    others = [m for m in list_methods() if "mvd_encoder" not in get_method(m).needs]
    params = {"image_teacher": {"model": "vit_image_tiny", "pretext": "mae",
                                "train": {"epochs": 1, "batch_size": 8, "lr": 3e-3, "betas": [0.9, 0.95], "device": "cpu"}}}
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")

    def call(name, methods):
        model = dsl.Model(name="model", uri=str(tmp_path / name / "model"))
        metrics = dsl.Metrics(name="metrics", uri=str(tmp_path / name / "metrics"))
        fn(params=params, section="image_teacher", code_version="test", methods=methods, needed_for="mvd_encoder",
           clips=dsl.Dataset(name="clips", uri=data["clips"], metadata={"data_hash": "h"}), model=model, metrics=metrics)
        return model, metrics

    model, metrics = call("skipped", others)
    assert sorted(p.name for p in Path(model.path).iterdir()) == ["SKIPPED"] and model.metadata["skipped"] is True
    assert json.loads(Path(metrics.path).read_text()) == {} and not (tmp_path / "mlflow.db").exists()

    model, metrics = call("ran", [others[0], "mvd"])
    _, info = load_model(Path(model.path) / "model.pt")
    assert info["extra"]["pretext"] == "mae" and model.metadata["skipped"] is False and model.metadata["mlflow_run_id"]
    scores = json.loads(Path(metrics.path).read_text())
    assert scores["heldout_loss"] < scores["heldout_loss_init"] and model.metadata["pretext"] == "mae"


def test_dvc_yaml_has_the_pre_training_stages_only_when_mvd_is_in_the_fan_out():
    from vidistill.config import load_params
    from vidistill_pipeline.dvc import build_dvc

    root = Path(__file__).resolve().parents[1]
    params = load_params(root / "params.yaml")
    params["pipeline"]["methods"] = [m for m in params["pipeline"]["methods"] if m != "mvd"]
    without = build_dvc(params, root)["stages"]
    assert not [s for s in without if s.startswith("mvd_")]
    params["pipeline"]["methods"].append("mvd")
    stages = build_dvc(params, root)["stages"]
    section = params["mvd_pretrain"]
    image, video, student = (stages[f"mvd_{s}"] for s in ("image_teacher", "video_teacher", "student"))
    assert image["cmd"].endswith("--section mvd_pretrain.image_teacher") and image["params"] == ["mvd_pretrain.image_teacher"]
    assert f"{section['image_teacher']['out']}/model.pt" in image["outs"]
    assert {section["student"]["image_teacher"], section["student"]["video_teacher"]} <= set(student["deps"])
    assert f"{section['video_teacher']['out']}/model.pt" in video["outs"] and "src/vidistill/train" in student["deps"]
    item = stages["distill"]["foreach"]["mvd"]
    assert item["args"] == f" --mvd-encoder {params['distill']['mvd_encoder']}"
    assert f"{section['student']['out']}/model.pt" == params["distill"]["mvd_encoder"]
    assert params["distill"]["mvd_encoder"] in {v for k, v in item.items() if k.startswith("input")}


@pytest.mark.parametrize("pretext", ["mae", "videomae"])
def test_the_benchmarks_trivial_baseline_is_the_held_out_loss_of_a_decoder_that_predicts_zero(data, pretext):
    from vidistill.benchmarks.mvd import zero_prediction_loss
    from vidistill.train.pretext import build_masked_task

    heldout = ClipDataset(data["clips"], "test")
    kind = "vit_image_tiny" if pretext == "mae" else "vit_video_tiny"
    task = build_masked_task(pretext, _vit(kind, 0), mask_ratio=0.75 if pretext == "mae" else 0.9,
                             heldout=FrameClips(heldout, random_frame=False) if pretext == "mae" else heldout)
    trained = task.heldout_loss()
    with torch.no_grad():
        task.decoder.head.weight.zero_()
        task.decoder.head.bias.zero_()
    zero = zero_prediction_loss(data["clips"], pretext, 0.75 if pretext == "mae" else 0.9)
    assert task.heldout_loss() == pytest.approx(zero, rel=1e-5) and abs(trained - zero) > 1e-3
