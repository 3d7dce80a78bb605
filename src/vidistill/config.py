"""Stage configurations: one dataclass per stage, one `params.yaml` section per stage.

Values come from (lowest to highest priority) the dataclass defaults, the stage's section of
`params.yaml`, and command-line flags. Every value is validated before any work starts
(`validate()`), so a bad parameter is refused with a message naming it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vidistill.errors import ConfigError
from vidistill.flow.params import TVL1Params
from vidistill.schema import flatten, from_dict, set_dotted, to_dict

__all__ = ["ClusterConfig", "ConfigError", "DistillConfig", "EvaluateConfig", "ExpertsConfig", "ExportConfig", "FlowConfig",
           "PipelineConfig", "PrepConfig", "RegisterConfig", "SynthConfig", "TeachConfig", "TrainConfig", "flatten",
           "from_dict", "load_params", "params_hash", "set_dotted", "to_dict", "validate_k8s_name",
           "validate_model_name", "validate_pipeline_params"]

DATASETS = ("ucf101", "hmdb51", "folder", "synthetic")


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _finite(name: str, value: float) -> None:
    _check(math.isfinite(value), f"{name} must be a finite number, got {value!r}")


# A registered-model name must come back unchanged from every `models:/` URI form (`models:/NAME@ALIAS`,
# `models:/NAME/VERSION`, `models:/NAME/latest`, `models:/NAME/STAGE`): MLflow refuses `/` and `:`, `@`
# separates the alias, `?`, `#` and `%` are URI syntax, and whitespace breaks command lines.
MODEL_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,254})")
# Kubernetes object names (PersistentVolumeClaim, Secret): RFC 1123 DNS subdomains, at most 253 characters.
K8S_NAME = re.compile(r"[a-z0-9](?:[-a-z0-9]*[a-z0-9])?(?:\.[a-z0-9](?:[-a-z0-9]*[a-z0-9])?)*")


def validate_model_name(name: str, key: str = "model_name") -> str:
    """Check a registered-model name for every `models:/` URI form; returns it.

    Raises:
        ConfigError: the name is empty or holds a character other than letters, digits, `.`, `_` and
            `-` (or does not start with a letter or digit); the message names the character.
    """
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"{key} must be a non-empty registered-model name, got {name!r}")
    if not MODEL_NAME.fullmatch(name):
        bad = sorted({c for c in name if not (c.isascii() and (c.isalnum() or c in "._-"))})
        if bad:
            what = f"character(s) {' '.join(repr(c) for c in bad)}"
        elif len(name) > 255:
            what = f"{len(name)} characters"
        else:
            what = "a first character other than a letter or digit"
        raise ConfigError(f"{key} {name!r} has {what}; a registered-model name must work in every models:/ URI form "
                          "(models:/NAME@ALIAS, models:/NAME/VERSION): use letters, digits, '.', '_' and '-', starting "
                          "with a letter or digit, at most 255 characters")
    return name


def validate_k8s_name(name: str, key: str) -> str:
    """Check a Kubernetes object name (PVC, Secret: an RFC 1123 DNS subdomain); returns it.

    Raises:
        ConfigError: not lower-case letters, digits, `-` and `.` starting and ending with a letter or
            digit, or longer than 253 characters.
    """
    if not isinstance(name, str) or not (K8S_NAME.fullmatch(name) and len(name) <= 253):
        raise ConfigError(f"{key} {name!r} is not a valid Kubernetes name: use lower-case letters, digits, '-' and '.', "
                          "starting and ending with a letter or digit, at most 253 characters (e.g. vidistill-data)")
    return name


@dataclass
class SynthConfig:
    """Synthetic motion dataset (see `vidistill.data.synthetic`)."""

    out: str = "data/raw/synthetic"
    domain: int = 0  # which class set and look; several domains give several datasets
    videos_per_class: int = 24
    frames: int = 24  # frames per generated video
    width: int = 96
    height: int = 72
    fps: int = 12
    seed: int = 0
    codec: str = "mpeg4"  # any encoder PyAV has; mpeg4 is fast and always present
    # appearance nuisance an RGB network must learn to ignore; at these defaults the videos are generator version 1's bytes
    colour_jitter: float = 0.0  # strength s in [0, 1] of a per-video colour transform, constant in time: hue ±180°·s, saturation ×[1-0.7s, 1+0.5s], channel order shuffled with probability s
    mixed_looks: bool = False  # palette, texture and shape of every object, and the background, drawn from the looks of domains 0-2
    hue_drift: float = 0.0  # per-object hue rotation at constant luma (BT.601), up to this many degrees per frame: grayscale (TV-L1's input) does not see it
    distractors: int = 2  # small objects moving in random directions, whatever the class
    distractor_speed: float = 1.5  # their largest speed, pixels per frame at 96x72

    def validate(self) -> None:
        _check(self.domain >= 0, f"synth.domain must be >= 0, got {self.domain}")
        _check(0.0 <= self.colour_jitter <= 1.0, f"synth.colour_jitter must be in [0, 1] (0 = off), got {self.colour_jitter}")
        _check(0.0 <= self.hue_drift <= 180.0, f"synth.hue_drift must be in [0, 180] degrees per frame (0 = off), got {self.hue_drift}")
        _check(self.distractors >= 0, f"synth.distractors must be >= 0, got {self.distractors}")
        _check(self.distractor_speed >= 0, f"synth.distractor_speed must be >= 0 pixels per frame, got {self.distractor_speed}")
        _check(self.videos_per_class >= 2, f"synth.videos_per_class must be >= 2 (one train, one test), got {self.videos_per_class}")
        _check(self.frames >= 2, f"synth.frames must be >= 2, got {self.frames}")
        _check(self.width >= 16 and self.height >= 16, f"synth size must be at least 16x16, got {self.width}x{self.height}")
        _check(self.width % 2 == 0 and self.height % 2 == 0, f"synth width/height must be even for the encoder, got {self.width}x{self.height}")


@dataclass
class PrepConfig:
    """Decode videos, sample fixed-size clips, write uint8 shards and a manifest."""

    dataset: str = "synthetic"  # ucf101 | hmdb51 | folder | synthetic
    root: str = "data/raw/synthetic"
    out: str = "data/clips"
    split: int = 1  # official split number for ucf101 (1-3) / hmdb51 (1-3)
    frames: int = 8  # T, frames per clip
    stride: int = 2  # temporal stride between sampled frames (train segment sampling)
    short_side: int = 64  # resize so the short side is this many pixels
    crop: int = 56  # square crop size H = W
    clips_per_video_train: int = 1
    clips_per_video_test: int = 1  # >1 = multi-clip evaluation (uniformly spread clips)
    test_fraction: float = 0.3  # folder/synthetic layouts: stratified, seeded split
    short_policy: str = "loop"  # videos shorter than T*stride: "loop" frames or "pad" with the last one
    shard_size: int = 256  # clips per shard file
    workers: int = 2  # decoding processes
    seed: int = 0
    synth: SynthConfig = field(default_factory=SynthConfig)

    def validate(self) -> None:
        _check(self.dataset in DATASETS, f"prep.dataset must be one of {', '.join(DATASETS)}, got {self.dataset!r}")
        _check(self.frames >= 1, f"prep.frames must be >= 1, got {self.frames}")
        _check(self.stride >= 1, f"prep.stride must be >= 1, got {self.stride}")
        _check(self.crop >= 8, f"prep.crop must be >= 8 pixels, got {self.crop}")
        _check(self.short_side >= self.crop, f"prep.short_side ({self.short_side}) must be >= prep.crop ({self.crop})")
        _check(self.clips_per_video_train >= 1 and self.clips_per_video_test >= 1, "prep.clips_per_video_* must be >= 1")
        _check(0.0 < self.test_fraction < 1.0, f"prep.test_fraction must be in (0, 1), got {self.test_fraction}")
        _check(self.short_policy in ("loop", "pad"), f"prep.short_policy must be 'loop' or 'pad', got {self.short_policy!r}")
        _check(self.shard_size >= 1, f"prep.shard_size must be >= 1, got {self.shard_size}")
        _check(self.workers >= 1, f"prep.workers must be >= 1, got {self.workers}")
        if self.dataset in ("ucf101", "hmdb51"):
            _check(self.split in (1, 2, 3), f"prep.split must be 1, 2 or 3 for {self.dataset}, got {self.split}")
        # prep generates the synthetic videos into prep.root: synth.out follows it unless set to something else
        _check(self.synth.out in (self.root, SynthConfig.out), f"prep.synth.out ({self.synth.out}) differs from prep.root "
               f"({self.root}); prep generates the synthetic videos into prep.root, so set only prep.root")
        self.synth.out = self.root
        self.synth.validate()


TVL1_COMPILE_MODES = ("off", "on", "graphs", "auto")


@dataclass
class FlowConfig:
    """TV-L1 optical flow for every clip from prep: `vidistill flow`."""

    clips: str = "data/clips"
    out: str = "data/flow"
    backend: str = "torch"  # torch | opencv
    device: str = "auto"  # auto | cpu | cuda[:N] (torch backend)
    batch_size: int = 64  # frame pairs per TV-L1 call (bounds memory)
    bound: float = 20.0  # uint8 storage clips flow to [-bound, bound] pixels
    workers: int = 2  # processes: the opencv backend's, and the torch backend's on CPU (one thread each)
    tvl1: TVL1Params = field(default_factory=TVL1Params)  # OpenCV DualTVL1 names and defaults, checked on creation
    tvl1_compile: str = "off"  # torch backend: off (eager) | on (torch.compile) | graphs (+ CUDA graphs) | auto (compiled on CUDA with Triton)

    def validate(self) -> None:
        _check(self.backend in ("torch", "opencv"), f"flow.backend must be 'torch' or 'opencv', got {self.backend!r}")
        _check(self.batch_size >= 1, f"flow.batch_size must be >= 1, got {self.batch_size}")
        _finite("flow.bound", self.bound)
        _check(self.bound > 0, f"flow.bound must be > 0, got {self.bound}")
        _check(self.workers >= 1, f"flow.workers must be >= 1, got {self.workers}")
        _check(self.tvl1_compile in TVL1_COMPILE_MODES, f"flow.tvl1_compile must be one of {', '.join(TVL1_COMPILE_MODES)}, "
               f"got {self.tvl1_compile!r}")


@dataclass
class TrainConfig:
    """Optimisation settings shared by teachers and students (the training loop)."""

    epochs: int = 10
    batch_size: int = 16
    lr: float = 3e-3
    weight_decay: float = 5e-4
    momentum: float = 0.9
    nesterov: bool = True  # sgd: Nesterov momentum
    betas: list = field(default_factory=lambda: [0.9, 0.999])  # AdamW (beta1, beta2); MAE/VideoMAE/MVD use 0.9, 0.95
    optimizer: str = "adamw"  # adamw | sgd
    warmup_epochs: int = 1
    schedule: str = "cosine"  # cosine: linear warm-up then cosine decay | constant: linear warm-up then constant
    label_smoothing: float = 0.0
    hflip: bool = False  # random horizontal flips (RGB and flow alike: a flip negates the flow's u)
    hflip_labels: str = "mirror"  # what a flip does to the label: mirror (a class named by a direction, left/right, cw/ccw, becomes its mirror class; data/augment.py mirror_label_map) | keep
    crop_scale: float = 1.0  # random resized crops back to the clip size: smallest crop area as a fraction; 1 = off
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    num_workers: int = 0
    grad_clip: float = 5.0

    def validate(self) -> None:
        for name in ("lr", "weight_decay", "momentum", "label_smoothing", "grad_clip"):
            _finite(name, getattr(self, name))
        _check(self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}")
        _check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        _check(self.lr > 0, f"lr must be > 0, got {self.lr}")
        _check(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        _check(self.optimizer in ("adamw", "sgd"), f"optimizer must be 'adamw' or 'sgd', got {self.optimizer!r}")
        try:
            self.betas = [float(b) for b in self.betas]
        except (TypeError, ValueError):
            raise ConfigError(f"betas must be two numbers, e.g. 0.9,0.95, got {self.betas!r}") from None
        _check(len(self.betas) == 2 and all(0.0 <= b < 1.0 for b in self.betas),
               f"betas must be two numbers in [0, 1), e.g. 0.9,0.95, got {self.betas!r}")
        _check(0 <= self.warmup_epochs < self.epochs or self.epochs == 1, f"warmup_epochs ({self.warmup_epochs}) must be < epochs ({self.epochs})")
        _check(self.schedule in ("cosine", "constant"), f"schedule must be 'cosine' or 'constant', got {self.schedule!r}")
        _check(self.hflip_labels in ("mirror", "keep"), f"hflip_labels must be 'mirror' (a flipped clip of a left/right or cw/ccw class "
               f"takes its mirror class's label) or 'keep', got {self.hflip_labels!r}")
        _check(0.0 < self.crop_scale <= 1.0, f"crop_scale must be in (0, 1] (smallest crop area as a fraction of the frame; 1 = no random crops), got {self.crop_scale}")
        _check(0.0 <= self.label_smoothing < 1.0, f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        _check(self.grad_clip >= 0, f"grad_clip must be >= 0 (0 = off), got {self.grad_clip}")
        _check(self.num_workers >= 0, f"num_workers must be >= 0, got {self.num_workers}")
        _check(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"), f"device must be auto, cpu or cuda[:N], got {self.device!r}")


@dataclass
class TeachConfig:
    """Teacher training: `vidistill teach`."""

    clips: str = "data/clips"
    flow: str = "data/flow"  # used when modality == "flow"
    out: str = ""  # empty: runs/teacher_<modality>
    modality: str = "rgb"  # rgb | flow
    model: str = "r2plus1d_teacher"
    # none: the clips' labels | pace: predict the playback speed | mae, videomae: masked pixel modelling |
    # mvd: masked video distillation from an MAE and a VideoMAE teacher (the self-supervised ones never read labels)
    pretext: str = "none"
    paces: int = 3  # pace: speeds 1x .. paces x
    init: str = ""  # model.pt whose encoder (every weight but the head) initialises the model, e.g. the pace encoder; "" = from scratch
    pretext_frames: int = 8  # pace: frames per clip, sampled from longer prep clips
    mask_ratio: float = 0.0  # mae/videomae/mvd: masked fraction; 0 = the paper's (mae 0.75, videomae and mvd 0.9)
    decoder_depth: int = 2  # mae/videomae/mvd: decoder blocks (MVD --decoder_depth 2)
    decoder_dim: int = 0  # decoder width; 0 = the encoder's
    decoder_heads: int = 0  # decoder heads; 0 = the encoder's
    # "" (the decoder_* keys) | release: the release's decoder for the pretext scaled to our widths (MAE 8 blocks x 2/3
    # the width, VideoMAE 4 x 1/2, MVD 2 x 1; train/pretext.py RELEASE_DECODERS) | small_data: VideoMAE's small-data
    # recipe (UCF101: tube masking 0.75, its 4-block decoder)
    recipe: str = ""
    image_teacher: str = "runs/mvd/image_teacher/model.pt"  # mvd: the MAE image teacher
    video_teacher: str = "runs/mvd/video_teacher/model.pt"  # mvd: the VideoMAE video teacher
    mvd_teachers: str = "both"  # mvd: both (co-teaching) | image | video
    image_weight: float = 1.0  # mvd: lambda_1
    video_weight: float = 1.0  # mvd: lambda_2
    resume: bool = False  # continue from out/checkpoints/last.pt; refused when it was made with other data or settings
    restart_if_stale: bool = False  # with resume: start over instead of refusing a checkpoint that does not match (DVC)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> None:
        from vidistill.train.pretext import DEFAULT_MASK_RATIO, MASKED_PRETEXTS, MVD_TEACHERS

        pretexts = ("none", "pace", *MASKED_PRETEXTS)
        _check(self.modality in ("rgb", "flow"), f"teach.modality must be 'rgb' or 'flow', got {self.modality!r}")
        _check(self.pretext in pretexts, f"teach.pretext must be one of {', '.join(pretexts)}, got {self.pretext!r}")
        if self.pretext == "pace":
            _check(self.modality == "rgb", "teach.pretext 'pace' trains an RGB encoder; use --modality rgb")
            _check(self.paces >= 2, f"teach.paces must be >= 2, got {self.paces}")
            _check(self.pretext_frames >= 2, f"teach.pretext_frames must be >= 2, got {self.pretext_frames}")
        _check(not self.init or self.pretext in ("none", "pace"), f"teach.init initialises a classifier or a pace encoder; "
               f"pretext {self.pretext!r} trains from scratch")
        from vidistill.train.pretext import RECIPES, SMALL_DATA_MASK_RATIO

        _check(self.recipe in RECIPES, f"teach.recipe must be one of {', '.join(repr(r) for r in RECIPES)} ('': the "
               f"decoder_* keys; release: the release's decoder; small_data: VideoMAE's small-data recipe), got {self.recipe!r}")
        _check(not self.recipe or self.pretext in MASKED_PRETEXTS, f"teach.recipe {self.recipe!r} is for the masked "
               f"pretexts ({', '.join(MASKED_PRETEXTS)}), not {self.pretext!r}")
        _check(self.recipe != "small_data" or self.pretext == "videomae", f"teach.recipe 'small_data' is VideoMAE's; "
               f"pretext {self.pretext!r} has none")
        if self.pretext in MASKED_PRETEXTS:
            _check(self.modality == "rgb", f"teach.pretext {self.pretext!r} trains an RGB ViT; use --modality rgb")
            if self.recipe == "small_data":
                self.mask_ratio = self.mask_ratio or SMALL_DATA_MASK_RATIO
            self.mask_ratio = self.mask_ratio or DEFAULT_MASK_RATIO[self.pretext]
            _check(0.0 < self.mask_ratio < 1.0, f"teach.mask_ratio must be in (0, 1), got {self.mask_ratio}")
            _check(self.decoder_depth >= 1, f"teach.decoder_depth must be >= 1, got {self.decoder_depth}")
            _check(self.decoder_dim >= 0 and self.decoder_heads >= 0,
                   f"teach.decoder_dim and decoder_heads must be >= 0 (0 = the encoder's), got {self.decoder_dim}, {self.decoder_heads}")
            _check(self.mvd_teachers in MVD_TEACHERS,
                   f"teach.mvd_teachers must be one of {', '.join(MVD_TEACHERS)}, got {self.mvd_teachers!r}")
            _check(self.image_weight >= 0 and self.video_weight >= 0,
                   f"teach.image_weight and video_weight must be >= 0, got {self.image_weight}, {self.video_weight}")
        self.out = self.out or f"runs/teacher_{self.modality}"
        from vidistill.models import list_models

        _check(self.model in list_models(), f"teach.model {self.model!r} is not a registered model; choose one of: {', '.join(list_models())}")
        self.train.validate()


@dataclass
class DistillConfig:
    """Student distillation: `vidistill distill --method KEY`."""

    clips: str = "data/clips"
    flow: str = "data/flow"  # read when the method needs flow (d3d)
    out: str = ""  # empty: runs/distill/<method>
    method: str = "kd"  # a key of vidistill.distill.list_methods()
    student: str = "r2plus1d_student"
    teacher_rgb: str = "runs/teacher_rgb/model.pt"
    teacher_flow: str = "runs/teacher_flow/model.pt"
    pretrained: str = ""  # model.pt of a pre-trained encoder (sd)
    mvd_encoder: str = "runs/mvd/student/model.pt"  # model.pt of the masked-pre-trained ViT that mvd fine-tunes
    experts: str = "runs/experts"  # `vidistill experts` output: experts of several datasets, cached embeddings (jedi)
    student_videos_per_class: int = 0  # the student's labelled videos per class, a stratified subset of clips' train split (teachers see all); 0 = all
    student_subset_seed: int = 0  # seed of that subset's draw
    resume: bool = False  # continue from out/checkpoints/last.pt; refused when it was made with other data or settings
    restart_if_stale: bool = False  # with resume: start over instead of refusing a checkpoint that does not match (DVC)
    train: TrainConfig = field(default_factory=TrainConfig)
    methods: dict = field(default_factory=dict)  # per-method hyperparameters: methods.<key>.<name>

    def validate(self) -> None:
        from vidistill.distill import get_method, list_methods, method_params
        from vidistill.models import list_models

        params = method_params(self.method, self.methods.get(self.method))  # unknown key / bad value -> ConfigError
        unknown = sorted(set(self.methods) - set(list_methods()))
        _check(not unknown, f"distill.methods has unknown method(s) {', '.join(unknown)}; valid: {', '.join(list_methods())}")
        _check(self.student in list_models(), f"distill.student {self.student!r} is not a registered model; choose one of: {', '.join(list_models())}")
        student = get_method(self.method).student_name(params, self.student)
        _check(student in list_models(), f"method {self.method!r} trains the student {student!r}, which is not a registered "
               f"model; choose one of: {', '.join(list_models())}")
        _check(self.student_videos_per_class >= 0, f"distill.student_videos_per_class must be >= 0 (0 = every training "
               f"video), got {self.student_videos_per_class}")
        self.out = self.out or f"runs/distill/{self.method}"
        self.train.validate()
        get_method(self.method).train_config(params, self.train).validate()  # a setting the method refuses, before any work


@dataclass
class EvaluateConfig:
    """Evaluation: `vidistill evaluate`."""

    clips: str = "data/clips"
    flow: str = "data/flow"
    checkpoint: str = "runs/teacher_rgb/model.pt"
    out: str = "runs/teacher_rgb/eval"
    split: str = "test"
    batch_size: int = 32
    device: str = "auto"

    def validate(self) -> None:
        _check(self.batch_size >= 1, f"evaluate.batch_size must be >= 1, got {self.batch_size}")
        _check(self.split in ("train", "test"), f"evaluate.split must be 'train' or 'test', got {self.split!r}")


# ----------------------------------------------------------------------------------------------
# params.yaml <-> dataclasses


def params_hash(cfg: Any) -> str:
    blob = json.dumps(to_dict(cfg), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def load_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    """Read params.yaml; a missing file means 'all defaults'."""
    p = Path(path)
    if not p.exists():
        return {}
    with p.open() as fh:
        data = yaml.safe_load(fh) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p} must hold a mapping of stage sections, got {type(data).__name__}")
    return data


@dataclass
class ExportConfig:
    """ONNX export with a parity gate: `vidistill export`."""

    model: str = "runs/distill/kd/model.pt"
    clips: str = "data/clips"  # parity is also checked on these evaluation clips
    out: str = ""  # empty: <model dir>/onnx
    opset: int = 18
    atol: float = 1e-4
    parity_clips: int = 32  # evaluation clips compared between PyTorch and ONNX Runtime
    # int8 (issue 29): <out>/int8/model.onnx, ONNX Runtime static QDQ quantization, gated on the evaluation clips
    int8: bool = False
    calibration_clips: int = 64  # training clips the int8 activation ranges are calibrated on
    int8_max_drop: float = 1.0  # largest top-1 drop of int8 vs float, in points (1.0 = 0.01 of top-1)
    # a Triton/KServe model repository beside model.onnx: <out>/model_repository/<name>/{1/model.onnx,config.pbtxt}
    repository: bool = True
    repository_name: str = "vidistill"  # the int8 model, when it passes its gate, is <name>-int8

    def validate(self) -> None:
        _check(self.opset >= 18, f"export.opset must be >= 18, got {self.opset}")
        _finite("export.atol", self.atol)
        _check(self.atol > 0, f"export.atol must be > 0, got {self.atol}")
        _check(self.parity_clips >= 1, f"export.parity_clips must be >= 1, got {self.parity_clips}")
        _check(self.calibration_clips >= 1, f"export.calibration_clips must be >= 1, got {self.calibration_clips}")
        _finite("export.int8_max_drop", self.int8_max_drop)
        _check(self.int8_max_drop >= 0, f"export.int8_max_drop must be >= 0 points of top-1, got {self.int8_max_drop}")
        _check(bool(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", self.repository_name)),
               f"export.repository_name must be letters, digits, '_', '.', '-', got {self.repository_name!r}")
        self.out = self.out or str(Path(self.model).parent / "onnx")


@dataclass
class RegisterConfig:
    """Register an exported student in MLflow and gate its promotion: `vidistill register`."""

    onnx: str = "runs/distill/kd/onnx"  # directory with model.onnx and parity.json
    metrics: str = "runs/distill/kd/eval/metrics.json"
    model_name: str = "vidistill-synthetic"  # one registered model per dataset
    method: str = "kd"
    margin: float = 0.0  # the candidate's top-1 must beat the champion's by at least this much
    metric: str = "top1"
    promote: bool = True
    precision: str = "fp32"  # "int8": register <onnx>/int8/model.onnx, only if its accuracy gate passed
    # > 0: the champion is the most accurate version whose measured latency (ms per clip, batch 1,
    # `latency_threads` ONNX Runtime threads on this machine) is within the budget; 0: the margin gate
    latency_budget_ms: float = 0.0
    latency_threads: int = 1

    def validate(self) -> None:
        validate_model_name(self.model_name, "register.model_name")
        _finite("register.margin", self.margin)
        _check(self.margin >= 0, f"register.margin must be >= 0, got {self.margin}")
        _check(self.precision in ("fp32", "int8"), f"register.precision must be fp32 or int8, got {self.precision!r}")
        _finite("register.latency_budget_ms", self.latency_budget_ms)
        _check(self.latency_budget_ms >= 0, f"register.latency_budget_ms must be >= 0 ms per clip (0: no budget), got {self.latency_budget_ms}")
        _check(self.latency_threads >= 1, f"register.latency_threads must be >= 1, got {self.latency_threads}")


# ----------------------------------------------------------------------------------------------
# several datasets (multi-dataset methods: jedi)

# prep keys every dataset of the list takes from the main dataset: every expert runs on every dataset's clips
CLIP_GEOMETRY = ("frames", "stride", "short_side", "crop", "short_policy", "clips_per_video_train", "clips_per_video_test")


@dataclass
class ExpertsConfig:
    """One expert per dataset, frozen, and their embeddings of every dataset's clips: `vidistill experts`.

    The main dataset is prep's output (`clips`): its expert's student is the product that is exported and
    promoted. `datasets` lists the others; each entry is a mapping with a `name` and either any `prep` key but
    the clip geometry, which every dataset takes from the main one (`CLIP_GEOMETRY`), e.g.
    `{name: synthetic_d1, dataset: synthetic, synth: {domain: 1, seed: 1}}` or
    `{name: mine, dataset: folder, root: /videos/mine}` (defaults: `root` = `data/raw/<name>`, `out` =
    `<experts.out>/clips/<name>`), or `clips`, an existing prep output of the same clip geometry. Label
    spaces are per dataset, so class names may overlap.
    """

    clips: str = "data/clips"  # the main dataset (prep's output)
    name: str = "main"  # the main dataset's name in metrics and file names
    datasets: list = field(default_factory=list)  # the other datasets (see above)
    out: str = "runs/experts"
    model: str = "r2plus1d_student"  # every expert's preset (its features are the cached embeddings)
    pretrained: str = ""  # model.pt whose encoder initialises every expert (the pace encoder: JEDI's experts are pre-trained); "" = from scratch
    embed_batch_size: int = 32  # clips per batch of the embedding pass
    resume: bool = False  # reuse an expert whose model.pt was trained on the same clips with the same settings
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> None:
        import re

        from vidistill.models import list_models

        names = [self.name]
        _check(bool(re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", self.name)), f"experts.name must be a letter then letters, digits "
               f"or _, got {self.name!r}")
        for i, entry in enumerate(self.datasets):
            where = f"experts.datasets[{i}]"
            _check(isinstance(entry, dict), f"{where} must be a mapping with a name and prep keys (dataset, root, split, "
                   f"synth...), got {entry!r}; set it in params.yaml")
            name = entry.get("name")
            _check(isinstance(name, str) and bool(re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", name)),
                   f"{where}.name must be a letter then letters, digits or _, got {name!r}")
            _check(name not in names, f"{where}.name {name!r} is used twice; every dataset needs its own name")
            names.append(name)
            if "clips" in entry:  # an existing prep output
                extra = sorted(set(entry) - {"name", "clips"})
                _check(not extra, f"{where} names prep output {entry['clips']!r} and prep keys {', '.join(extra)}; give "
                       "either `clips` (an existing prep output) or prep keys (videos to prepare)")
                continue
            fixed = sorted(set(entry) & set(CLIP_GEOMETRY))
            _check(not fixed, f"{where} sets {', '.join(fixed)}: every dataset takes the clip geometry of the main dataset "
                   "(prep), because every expert runs on every dataset's clips; remove them")
            try:
                dataset_prep(self, i).validate()
            except ConfigError as exc:
                raise ConfigError(f"{where} ({name}): {exc}") from None
        _check(len(names) >= 2, "experts.datasets is empty: a multi-dataset method needs at least one dataset besides "
               "the main one")
        _check(self.embed_batch_size >= 1, f"experts.embed_batch_size must be >= 1, got {self.embed_batch_size}")
        _check(self.model in list_models(), f"experts.model {self.model!r} is not a registered model; choose one of: "
               f"{', '.join(list_models())}")
        self.train.validate()


def dataset_prep(cfg: ExpertsConfig, i: int, geometry: dict[str, Any] | None = None) -> PrepConfig:
    """The prep configuration of `cfg.datasets[i]`: its keys over the defaults, the clip `geometry` (a
    prep manifest's `params`, i.e. the main dataset's) over both. A synthetic dataset also takes the main
    dataset's generator settings (videos per class, frames, size, codec) unless it sets them; its
    `domain` and `seed` are its own.

    Raises:
        ConfigError: an unknown key or a bad value, named as `experts.datasets[i].<key>`.
    """
    entry = {k: v for k, v in cfg.datasets[i].items() if k != "name"}
    name = cfg.datasets[i]["name"]
    entry.setdefault("root", f"data/raw/{name}")
    entry.setdefault("out", f"{cfg.out}/clips/{name}")
    inherited = {k: v for k, v in ((geometry or {}).get("synth") or {}).items() if k not in ("out", "domain", "seed")}
    entry["synth"] = {**inherited, "out": entry["root"], **dict(entry.get("synth") or {})}
    prep = from_dict(PrepConfig, entry, where=f"experts.datasets[{i}].")
    for key in CLIP_GEOMETRY:
        if geometry and key in geometry:
            setattr(prep, key, geometry[key])
    return prep


# ----------------------------------------------------------------------------------------------
# the pipeline (`vidistill pipeline ...`, `vidistill demo`)

# GPU node pools the Kubeflow pipeline can schedule onto (the orchestration's dag.GPU_POOLS holds their labels)
GPU_POOL_NAMES = ("gke", "aks", "eks")


@dataclass
class ClusterConfig:
    """Where the compiled pipeline's tasks run: the GPU node pool and the Kubernetes objects they read.

    Read from the environment when the pipeline is compiled (`from_env`; a cluster overlay's
    `k8s/overlays/*/pipeline.env` sets them): `VIDISTILL_GPU_POOL`, `VIDISTILL_GPU_TYPE`,
    `VIDISTILL_DATA_PVC`, `VIDISTILL_MLFLOW_CONFIG`, `VIDISTILL_MLFLOW_SECRET`.

    Every task takes `MLFLOW_TRACKING_URI` from the ConfigMap `mlflow_config` (k8s/base/mlflow.yaml
    creates it) and, where a login stands in front of MLflow, `MLFLOW_TRACKING_USERNAME`/`_PASSWORD`/
    `_TOKEN` from the Secret `mlflow_secret`, which is optional: MLflow as k8s/base deploys it has no
    authentication, and a missing optional Secret starts the pod (k8s/README.md, "Secrets").
    """

    gpu_pool: str = "gke"  # one of GPU_POOL_NAMES
    gpu_type: str = ""  # the node label's value (e.g. nvidia-tesla-a100 on GKE); empty: the pool's default
    data_pvc: str = "vidistill-data"  # PersistentVolumeClaim mounted at /data by every task
    mlflow_config: str = "vidistill-mlflow-client"  # ConfigMap with MLFLOW_TRACKING_URI
    mlflow_secret: str = "vidistill-mlflow-auth"  # optional Secret with MLflow credentials

    ENV = {"gpu_pool": "VIDISTILL_GPU_POOL", "gpu_type": "VIDISTILL_GPU_TYPE", "data_pvc": "VIDISTILL_DATA_PVC",
           "mlflow_config": "VIDISTILL_MLFLOW_CONFIG", "mlflow_secret": "VIDISTILL_MLFLOW_SECRET"}

    @classmethod
    def from_env(cls) -> ClusterConfig:
        """The defaults, overridden by the environment variables; validated."""
        cfg = cls(**{name: os.environ[var] for name, var in cls.ENV.items() if os.environ.get(var)})
        cfg.validate()
        return cfg

    def validate(self) -> None:
        _check(self.gpu_pool in GPU_POOL_NAMES, f"GPU pool {self.gpu_pool!r} ({self.ENV['gpu_pool']}) is not known; "
               f"choose one of: {', '.join(GPU_POOL_NAMES)}")
        _check(not self.gpu_type or re.fullmatch(r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?", self.gpu_type) is not None,
               f"GPU type {self.gpu_type!r} ({self.ENV['gpu_type']}) is not a valid Kubernetes label value "
               "(e.g. nvidia-l4, nvidia-tesla-a100, nvidia-tesla-t4)")
        validate_k8s_name(self.data_pvc, f"the data PVC name ({self.ENV['data_pvc']})")
        validate_k8s_name(self.mlflow_config, f"the MLflow ConfigMap name ({self.ENV['mlflow_config']})")
        validate_k8s_name(self.mlflow_secret, f"the MLflow Secret name ({self.ENV['mlflow_secret']})")


@dataclass
class PipelineConfig:
    """The `pipeline` section of params.yaml: what the Kubeflow pipeline fans out over and registers."""

    methods: list | None = None  # distillation methods of the fan-out; None (key absent): every registered method
    run_name: str = "vidistill"  # MLflow parent run name
    shards: int = 1  # prep and flow fan out over this many pods (docs/scale-out.md); any value gives the same data
    source_prep: dict = field(default_factory=dict)  # a prep section: the source videos sd's encoder pre-trains on

    def validate(self) -> None:
        from vidistill.distill import list_methods

        registered = list_methods()
        if self.methods is None:
            self.methods = registered
        if isinstance(self.methods, str):  # from the command line: "none,kd"
            self.methods = [m.strip() for m in self.methods.split(",") if m.strip()]
        _check(isinstance(self.methods, list) and len(self.methods) > 0,
               f"pipeline.methods must be a non-empty list of methods, got {self.methods!r}; registered: {', '.join(registered)}")
        bad = [m for m in self.methods if not isinstance(m, str)]
        _check(not bad, f"pipeline.methods must hold method names, got {bad!r}; registered: {', '.join(registered)}")
        unknown = [m for m in self.methods if m not in registered]
        _check(not unknown, f"pipeline.methods names unknown method(s) {', '.join(unknown)}; registered: {', '.join(registered)}")
        twice = sorted({m for m in self.methods if self.methods.count(m) > 1})
        _check(not twice, f"pipeline.methods lists {', '.join(twice)} more than once; list each method once")
        _check(bool(self.run_name.strip()) and len(self.run_name) <= 250,
               f"pipeline.run_name must be 1 to 250 characters, got {self.run_name!r}")
        _check(isinstance(self.shards, int) and not isinstance(self.shards, bool) and self.shards >= 1,
               f"pipeline.shards must be an integer >= 1 (pieces prep and flow fan out over), got {self.shards!r}")
        _validate_section("pipeline.source_prep", PrepConfig, self.source_prep)


def _validate_section(section: str, cls: type, data: dict[str, Any] | None) -> None:
    """Build and validate one section; a message that does not name the section is prefixed with it."""
    try:
        from_dict(cls, copy.deepcopy(data or {}), where=f"{section}.").validate()
    except ConfigError as exc:
        msg = str(exc)
        raise ConfigError(msg if msg.startswith((section, f"unknown key(s) {section}")) else f"{section}: {msg}") from None


# params.yaml section -> its configuration, for every stage section the pipeline runs
PIPELINE_SECTIONS: dict[str, type] = {
    "prep": PrepConfig, "flow": FlowConfig, "teach": TeachConfig, "pretrain": TeachConfig, "distill": DistillConfig,
    "evaluate": EvaluateConfig, "export": ExportConfig, "register": RegisterConfig,
    "experts": ExpertsConfig,  # multi-dataset methods (jedi)
}
MVD_PRETRAIN_STAGES = ("image_teacher", "video_teacher", "student")  # params.yaml mvd_pretrain.<stage>: `teach` sections


# `pipeline` keys of earlier releases -> where the setting lives now
MOVED_PIPELINE_KEYS = {"model_name": "register.model_name", "promotion_margin": "register.margin"}


def validate_pipeline_params(params: dict[str, Any]) -> dict[str, Any]:
    """Check everything the pipeline will read, before any task starts; returns the params with the
    `pipeline` section's values typed as its dataclass says (`methods: none,kd` becomes a list).

    Checks the `pipeline` section (`PipelineConfig`), every stage section it runs (unknown keys,
    types, ranges), the distillation settings of every method of the fan-out, and the cluster
    settings in the environment (`ClusterConfig`).

    Raises:
        ConfigError: the first bad value, named with its key (one line).
    """
    params = copy.deepcopy(params or {})
    unknown = sorted(set(params) - {*PIPELINE_SECTIONS, "pipeline", "mvd_pretrain"})
    _check(not unknown, f"unknown params.yaml section(s) {', '.join(unknown)}; sections: {', '.join((*PIPELINE_SECTIONS, 'mvd_pretrain', 'pipeline'))}")
    for section, value in params.items():
        _check(value is None or isinstance(value, dict), f"params section {section!r} must be a mapping, got {value!r}")
    moved = sorted(set(params.get("pipeline") or {}) & set(MOVED_PIPELINE_KEYS))
    _check(not moved, "; ".join(f"pipeline.{k} is now {MOVED_PIPELINE_KEYS[k]}" for k in moved))
    pipe = from_dict(PipelineConfig, params.get("pipeline") or {}, where="pipeline.")
    pipe.validate()
    for section, cls in PIPELINE_SECTIONS.items():
        _validate_section(section, cls, params.get(section))
    for modality in ("rgb", "flow"):  # both teachers read the teach section
        _validate_section("teach", TeachConfig, {**(params.get("teach") or {}), "modality": modality})
    for method in pipe.methods:  # the fan-out: each method with the distill section's settings
        _validate_section("distill", DistillConfig, {**(params.get("distill") or {}), "method": method})
    masked = params.get("mvd_pretrain") or {}  # mvd's pre-training stages (run only when the fan-out needs them)
    _check(isinstance(masked, dict) and not set(masked) - set(MVD_PRETRAIN_STAGES),
           f"mvd_pretrain may hold only {', '.join(MVD_PRETRAIN_STAGES)}, got {sorted(masked) if isinstance(masked, dict) else masked!r}")
    for stage, value in masked.items():
        _validate_section(f"mvd_pretrain.{stage}", TeachConfig, value)
    ClusterConfig.from_env()
    section = dict(params.get("pipeline") or {})
    section.update(methods=list(pipe.methods), run_name=pipe.run_name, shards=pipe.shards)
    params["pipeline"] = section
    return params
