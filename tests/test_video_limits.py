"""Frame counts and read limits for videos whose headers understate their frames."""

from __future__ import annotations

import subprocess

import imageio_ffmpeg
import pytest

from atoken.io.media import MediaError, count_video_frames, iter_video_frames, probe_video
from atoken.pipelines.reconstruct import VideoLimits, check_video


def _make_clip(path, source: str, *args: str):
    """Encode a lavfi test source with the bundled ffmpeg."""
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-nostdin", "-v", "error", "-y"]
    subprocess.run([*cmd, "-f", "lavfi", "-i", source, *args, str(path)], check=True)
    return path


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("clips")
    return {
        # 10 s at 1000 fps: the header says "1k fps", which reads as no frame rate
        "fast": _make_clip(
            d / "fast.mp4", "testsrc=size=32x32:rate=1000:duration=10", "-pix_fmt", "yuv420p"
        ),
        # 100 frames: 50 at 50 fps, then 50 at 5 fps; a constant-rate reader makes 1084 of them
        "vfr_gif": _make_clip(
            d / "vfr.gif",
            "testsrc=size=32x24:rate=25:duration=4",
            "-vf",
            "setpts='if(lt(N,50),N/50,1+(N-50)/5)/TB'",
            "-fps_mode",
            "passthrough",
        ),
        "mp4": _make_clip(
            d / "v.mp4", "testsrc=size=48x32:rate=12:duration=2", "-pix_fmt", "yuv420p"
        ),
        "webm": _make_clip(d / "v.webm", "testsrc=size=48x32:rate=25:duration=1"),
        "gif": _make_clip(d / "v.gif", "testsrc=size=48x32:rate=10:duration=2"),
    }


def test_count_finds_the_frames_a_header_hides(clips):
    estimate = probe_video(clips["fast"], count=False)
    assert not estimate.counted and estimate.num_frames == 250  # 10 s x an assumed 25 fps
    info = probe_video(clips["fast"])
    assert info.counted and info.num_frames == 10_000
    assert info.fps == pytest.approx(1000.0) and info.duration == pytest.approx(10.0, abs=0.01)
    assert count_video_frames(clips["fast"])[0] == 10_000


def test_check_video_refuses_by_counted_frames(clips):
    app = VideoLimits(max_frames=256, max_duration=120.0, max_read_frames=2048)
    with pytest.raises(MediaError, match="10000 frames after stride 1; the limit is 256"):
        check_video(clips["fast"], app)
    with pytest.raises(MediaError, match="10000 would be decoded .* the limit is 2048"):
        check_video(clips["fast"], app, stride=40)  # 250 frames kept, 10000 decoded
    # 256 frames at stride 8 decode frames 0..2040: within both limits
    assert check_video(clips["fast"], app, stride=8, max_frames=256).num_frames == 10_000
    with pytest.raises(MediaError, match="2049 would be decoded"):
        check_video(clips["fast"], VideoLimits(max_read_frames=2048), stride=8, max_frames=257)


def test_max_read_is_a_hard_stop(clips):
    got = []
    with pytest.raises(MediaError, match="more than 300 frames; the limit is 300"):
        for frame in iter_video_frames(clips["fast"], max_read=300):
            got.append(frame)
    assert len(got) == 300
    got = []
    with pytest.raises(MediaError, match="the limit is 300"):
        for frame in iter_video_frames(clips["fast"], stride=3, max_read=300):
            got.append(frame)
    assert len(got) == 100  # frames 0, 3, ..., 297
    # stopping at max_frames is not an error: 100 frames at stride 3 end at frame 297
    frames = list(iter_video_frames(clips["fast"], stride=3, max_frames=100, max_read=298))
    assert len(frames) == 100


def test_ffmpeg_is_stopped_when_the_limit_trips(clips):
    psutil = pytest.importorskip("psutil")

    def ffmpegs():
        return [p for p in psutil.Process().children(recursive=True) if "ffmpeg" in p.name()]

    before = len(ffmpegs())
    frames = iter_video_frames(clips["fast"], max_read=50)
    with pytest.raises(MediaError, match="limit is 50"):
        for _ in frames:
            pass
    frames = iter_video_frames(clips["fast"])
    next(frames)
    frames.close()  # a consumer that stops early
    assert len(ffmpegs()) == before


def test_variable_frame_rate_is_read_frame_by_frame(clips):
    info = probe_video(clips["vfr_gif"])
    assert info.num_frames == 100 and info.fps == pytest.approx(100 / info.duration)
    assert len(list(iter_video_frames(clips["vfr_gif"]))) == 100


@pytest.mark.parametrize(
    ("name", "frames", "fps"), [("mp4", 24, 12), ("webm", 25, 25), ("gif", 20, 10)]
)
def test_counts_match_what_is_read(clips, name, frames, fps):
    info = probe_video(clips[name])
    assert (info.width, info.height, info.num_frames) == (48, 32, frames)
    assert info.fps == pytest.approx(fps)
    assert len(list(iter_video_frames(clips[name]))) == frames
    assert len(list(iter_video_frames(clips[name], stride=2, max_read=frames))) == (frames + 1) // 2


def test_counting_has_a_time_limit(clips):
    with pytest.raises(MediaError, match="the limit is 0.001 s"):
        probe_video(clips["fast"], max_count_seconds=0.001)
