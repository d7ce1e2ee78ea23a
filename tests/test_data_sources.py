"""LoadImages over folders, globs, lists and videos; LoadStreams errors and a file stream."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from data.sources import LoadImages, LoadStreams


@pytest.fixture()
def media(tmp_path):
    cv2.imwrite(str(tmp_path / "a.jpg"), np.full((60, 100, 3), 50, np.uint8))
    cv2.imwrite(str(tmp_path / "b.png"), np.full((90, 40, 3), 200, np.uint8))
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    (tmp_path / "notes.md").write_text("not media")
    return tmp_path


def _write_video(path, frames: int = 10, size=(64, 48), fps: float = 5.0):
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
    assert writer.isOpened()
    for k in range(frames):
        writer.write(np.full((size[1], size[0], 3), (k * 20) % 256, np.uint8))
    writer.release()
    return path


def test_folder_yields_letterboxed_images_and_skips_unreadable_ones(media, caplog):
    loader = LoadImages(media, img_size=64, stride=32)
    assert loader.nf == 3 and loader.mode == "image"
    assert "notes.md: not an image or video format" in caplog.text
    items = list(loader)
    assert [p.rsplit("/", 1)[-1] for p, *_ in items] == ["a.jpg", "b.png"]
    assert "broken.jpg" in caplog.text and "cannot be decoded, skipped" in caplog.text
    path, im, im0, cap, status = items[0]
    assert im0.shape == (60, 100, 3) and cap is None and status.startswith("image 1/3 ")
    assert im.shape == (3, 64, 64)  # 100x60 -> 64x38, padded up to a multiple of 32
    assert im.dtype == np.uint8 and im.flags["C_CONTIGUOUS"]
    assert items[1][1].shape == (3, 64, 32)  # 40x90 -> 28x64 -> width padded to 32
    square = list(LoadImages(media / "a.jpg", img_size=64, auto=False))
    assert square[0][1].shape == (3, 64, 64) and (square[0][1][:, :13] == 114).all()


def test_glob_and_list_file_sources(media):
    assert [p.rsplit("/", 1)[-1] for p, *_ in LoadImages(str(media / "*.png"), img_size=32)] == ["b.png"]
    listing = media / "list.txt"
    listing.write_text("a.jpg\nb.png\n")
    assert len(list(LoadImages(listing, img_size=32))) == 2


def test_video_frames_with_and_without_stride(tmp_path):
    video = _write_video(tmp_path / "clip.mp4")
    loader = LoadImages(video, img_size=64)
    assert loader.frames == 10 and loader.fps == pytest.approx(5.0)
    frames = list(loader)
    assert len(frames) == 10 and loader.mode == "video"
    path, im, im0, cap, status = frames[3]
    assert im0.shape == (48, 64, 3) and im.shape == (3, 64, 64) and cap is not None
    assert status.startswith("video 1/1 (4/10) ")
    assert abs(int(im0.mean()) - 60) <= 3  # the fourth frame (value 3 * 20), mp4 is lossy
    strided = list(LoadImages(video, img_size=64, vid_stride=2))
    assert len(strided) == 5 and abs(int(strided[0][2].mean()) - 20) <= 3  # frames 2, 4, ...


def test_images_then_videos_in_one_folder(tmp_path):
    cv2.imwrite(str(tmp_path / "z.jpg"), np.zeros((32, 32, 3), np.uint8))
    _write_video(tmp_path / "a.mp4", frames=3)
    modes = [(p.rsplit("/", 1)[-1], cap is None) for p, _, _, cap, _ in LoadImages(tmp_path, img_size=32)]
    assert modes == [("z.jpg", True), ("a.mp4", False), ("a.mp4", False), ("a.mp4", False)]


def test_missing_or_empty_sources_raise(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing_here.jpg does not exist"):
        LoadImages(tmp_path / "nothing_here.jpg")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images or videos found"):
        LoadImages(tmp_path / "empty")


def test_unreachable_stream_raises_connection_error(tmp_path):
    with pytest.raises(ConnectionError, match="no_such_stream.mp4: cannot be opened"):
        LoadStreams(str(tmp_path / "no_such_stream.mp4"))


def test_video_file_read_as_a_stream(tmp_path):
    video = _write_video(tmp_path / "clip.mp4", frames=30)
    streams = LoadStreams(str(video), img_size=64)
    assert streams.frames == [30] and streams.fps == [pytest.approx(5.0)]
    batches = list(streams)  # ends when the reader thread reaches the end of the file
    for sources, im, im0, cap, status in batches:
        assert sources == [str(video)] and im.shape == (1, 3, 64, 64) and im0[0].shape == (48, 64, 3)
    assert all(not t.is_alive() for t in streams.threads)
    assert abs(int(streams.imgs[0].mean()) - (29 * 20) % 256) <= 3  # the reader got to the last frame
