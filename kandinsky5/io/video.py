"""Writing generated frames to an H.264 MP4 with PyAV, with the call signature of ``diffusers.utils.export_to_video``.

Also the checks the CLI runs before it loads any model (``check_output_path``), and the last resort that keeps a
finished generation when the MP4 cannot be written (``save_frames_fallback``). Both writers write to a temporary
name beside the output and rename it when complete (``kandinsky5/io/atomic.py``): an error or an interrupt leaves no
partial file.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
import sys
import tempfile
from fractions import Fraction
from pathlib import Path

import numpy as np
import PIL.Image

from kandinsky5.io.atomic import atomic_path, check_writable_file

logger = logging.getLogger(__name__)

VIDEO_SUFFIX = ".mp4"
VIDEO_CODEC = "libx264"
# 4:2:0 chroma subsampling halves both chroma dimensions, so the encoded width and height must be even.
PIXEL_FORMAT = "yuv420p"
CHROMA_SUBSAMPLING = 2
RGB_CHANNELS = 3
MAX_PIXEL_VALUE = 255

# diffusers' `quality` goes from 0 (worst) to 10 (best); x264's CRF from 51 (worst) to 0 (best, lossless).
# The mapping is imageio-ffmpeg's, which diffusers' export_to_video uses: crf = int((1 - quality / 10) * 51),
# so 10 -> 0, 9 -> 5, 8 -> 10, 7 -> 15, 6 -> 20, 5 (default) -> 25, 4 -> 30, 2 -> 40, 0 -> 51.
MAX_QUALITY = 10.0
MAX_CRF = 51
# Float frames may stray this far outside [0, 1] (rounding in the VAE decode) before they are rejected.
FLOAT_RANGE_TOLERANCE = 1e-3
# Largest denominator kept when a float fps is turned into the exact rational frame rate the container stores.
MAX_FPS_DENOMINATOR = 1001 * 1000


def quality_to_crf(quality: float) -> int:
    """x264 CRF for diffusers' 0..10 ``quality`` (10 = best): imageio-ffmpeg's linear map onto CRF 51..0."""
    return int((1.0 - quality / MAX_QUALITY) * MAX_CRF)


def _is_torch_tensor(value) -> bool:
    # torch is only consulted when the caller has already imported it: a tensor cannot exist otherwise.
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


def _float_to_uint8(frames, name: str) -> np.ndarray:
    """Float frames in [0, 1] (an array or a sequence of equal arrays) -> one uint8 array, frame by frame.

    One frame at a time keeps the work in cache and never holds a float copy of the whole video (a 5 s clip at
    512x768 is over half a gigabyte in float32). ``min``/``max`` propagate NaN, so they also catch non-finite values.
    """
    out = np.empty((len(frames), *frames[0].shape), dtype=np.uint8)
    for index, frame in enumerate(frames):
        low, high = float(frame.min()), float(frame.max())
        if math.isnan(low) or math.isnan(high) or math.isinf(low) or math.isinf(high):
            raise ValueError(f"{name}: float frames contain NaN or infinite values (frame {index})")
        if low < -FLOAT_RANGE_TOLERANCE or high > 1.0 + FLOAT_RANGE_TOLERANCE:
            raise ValueError(
                f"{name}: float frames must lie in [0, 1], got values in [{low:.4g}, {high:.4g}] (frame {index}) "
                "(pass uint8 for 0..255, and map [-1, 1] outputs to [0, 1] first)"
            )
        scaled = np.clip(frame, 0.0, 1.0)
        np.multiply(scaled, MAX_PIXEL_VALUE, out=scaled)
        np.round(scaled, out=scaled)
        out[index] = scaled
    return out


def _array_to_uint8(frames: np.ndarray, name: str) -> np.ndarray:
    if frames.dtype == np.uint8:
        return frames
    if np.issubdtype(frames.dtype, np.floating):
        return _float_to_uint8(frames, name)
    raise ValueError(f"{name}: frames must be float in [0, 1] or uint8, got dtype {frames.dtype}")


def frames_to_uint8(video_frames, name: str = "video_frames") -> np.ndarray:
    """A (F, H, W, 3) uint8 array from any accepted frame format; ``ValueError`` naming ``name`` otherwise.

    Accepted: a list of PIL images; a list of (H, W, 3) arrays; a (F, H, W, 3) array; a torch tensor (F, H, W, 3) or
    (F, 3, H, W). Float values must be in [0, 1]; uint8 values are taken as they are.
    """
    if _is_torch_tensor(video_frames):
        tensor = video_frames.detach().cpu()
        if tensor.ndim == 4 and tensor.shape[-1] != RGB_CHANNELS and tensor.shape[1] == RGB_CHANNELS:
            tensor = tensor.permute(0, 2, 3, 1)
        if tensor.is_floating_point():
            tensor = tensor.float()
        video_frames = tensor.contiguous().numpy()
    elif isinstance(video_frames, list | tuple):
        if len(video_frames) == 0:
            raise ValueError(f"{name}: got no frames")
        if all(isinstance(frame, PIL.Image.Image) for frame in video_frames):
            sizes = {frame.size for frame in video_frames}
            if len(sizes) != 1:
                raise ValueError(f"{name}: all images must have the same size, got {sorted(sizes)}")
            video_frames = np.stack([np.asarray(frame.convert("RGB")) for frame in video_frames])
        elif all(isinstance(frame, np.ndarray) for frame in video_frames):
            shapes = {frame.shape for frame in video_frames}
            dtypes = {frame.dtype for frame in video_frames}
            if len(shapes) != 1 or len(dtypes) != 1:
                raise ValueError(f"{name}: all frames must share one shape and dtype, got {shapes} and {dtypes}")
            frame_shape = next(iter(shapes))
            well_formed = len(frame_shape) == 3 and frame_shape[-1] == RGB_CHANNELS and 0 not in frame_shape
            if well_formed and np.issubdtype(next(iter(dtypes)), np.floating):
                video_frames = _float_to_uint8(video_frames, name)  # no float copy of the whole video
            else:
                video_frames = np.stack(video_frames)
        else:
            kinds = sorted({type(frame).__name__ for frame in video_frames})
            raise ValueError(f"{name}: a list must hold only PIL images or only numpy arrays, got {kinds}")
    elif not isinstance(video_frames, np.ndarray):
        raise ValueError(
            f"{name}: expected a list of PIL images or numpy arrays, a numpy array or a torch tensor, "
            f"got {type(video_frames).__name__}"
        )

    if video_frames.ndim == 5 and video_frames.shape[0] == 1:
        raise ValueError(f"{name}: got a batch of shape {video_frames.shape}; pass one video, e.g. `output.frames[0]`")
    if video_frames.ndim != 4 or video_frames.shape[-1] != RGB_CHANNELS:
        raise ValueError(f"{name}: expected frames of shape (F, H, W, 3), got {video_frames.shape}")
    if 0 in video_frames.shape:
        raise ValueError(f"{name}: got an empty video of shape {video_frames.shape}")
    return _array_to_uint8(video_frames, name)


def _pad_to_multiple(frames: np.ndarray, multiple: int) -> np.ndarray:
    """Pad bottom and right by repeating the edge pixels, up to the next multiple of ``multiple``."""
    height, width = frames.shape[1:3]
    pad_h, pad_w = (-height) % multiple, (-width) % multiple
    if pad_h == 0 and pad_w == 0:
        return frames
    logger.warning(
        "Frame size %dx%d (WxH) is not divisible by %d; padding it to %dx%d by repeating the edge pixels",
        width,
        height,
        multiple,
        width + pad_w,
        height + pad_h,
    )
    return np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")


def _frame_rate(fps) -> Fraction:
    if isinstance(fps, bool) or not isinstance(fps, numbers.Real) or not math.isfinite(fps) or fps <= 0:
        raise ValueError(f"fps: expected a positive number, got {fps!r}")
    exact = Fraction(fps) if isinstance(fps, numbers.Rational) else Fraction(float(fps))
    return exact.limit_denominator(MAX_FPS_DENOMINATOR)


def export_to_video(
    video_frames,
    output_video_path: str | os.PathLike | None = None,
    fps: float = 24,
    quality: float | None = 5.0,
    bitrate: int | None = None,
    macro_block_size: int | None = 16,
) -> str:
    """Write frames as an H.264 (libx264, yuv420p) video in an MP4 container and return its path.

    Args:
        video_frames: a list of PIL images, a list of (H, W, 3) numpy arrays, a (F, H, W, 3) numpy array, or a
            torch tensor (F, H, W, 3) or (F, 3, H, W); floats in [0, 1] or uint8 in [0, 255].
        output_video_path: where to write; a new temporary ``.mp4`` file when None. The container is MP4 whatever
            the suffix. The video is encoded under a temporary name beside it and renamed onto it when complete;
            when encoding fails or is interrupted, nothing is left there (an earlier file of that name is kept).
        fps: frames per second, stored exactly (24000/1001 stays 24000/1001).
        quality: diffusers' 0..10 scale, 10 = best, mapped to x264's CRF by ``quality_to_crf``
            (5 -> CRF 25, 9 -> CRF 5). 10 -> CRF 0 is lossless x264, which uses the "High 4:4:4 Predictive"
            profile that browsers and QuickTime cannot play (as with diffusers). None leaves x264's default (CRF 23).
        bitrate: a target bit rate in bit/s; when set, ``quality`` is ignored.
        macro_block_size: width and height are padded up to a multiple of this, repeating the edge pixels (imageio
            rescales instead, which blurs the whole frame). None or 1 pads only to even sizes, which yuv420p needs.
    """
    frames = frames_to_uint8(video_frames)
    rate = _frame_rate(fps)
    if quality is not None and not (isinstance(quality, numbers.Real) and 0 <= quality <= MAX_QUALITY):
        raise ValueError(f"quality: expected a number in [0, {MAX_QUALITY:g}] or None, got {quality!r}")
    if bitrate is not None and (isinstance(bitrate, bool) or not isinstance(bitrate, numbers.Integral) or bitrate <= 0):
        raise ValueError(f"bitrate: expected a positive integer (bit/s) or None, got {bitrate!r}")
    if macro_block_size is not None and (not isinstance(macro_block_size, numbers.Integral) or macro_block_size < 1):
        raise ValueError(f"macro_block_size: expected a positive integer or None, got {macro_block_size!r}")

    frames = _pad_to_multiple(frames, math.lcm(int(macro_block_size or 1), CHROMA_SUBSAMPLING))

    reserved = output_video_path is None
    if reserved:
        with tempfile.NamedTemporaryFile(suffix=VIDEO_SUFFIX, delete=False) as handle:
            output_video_path = handle.name
    output_video_path = os.fspath(output_video_path)

    import av

    options = {}
    if bitrate is None and quality is not None:
        options["crf"] = str(quality_to_crf(quality))
    try:
        # The container is closed (its index written) before the temporary file is renamed into place.
        with atomic_path(output_video_path) as temporary, av.open(str(temporary), mode="w", format="mp4") as container:
            stream = container.add_stream(VIDEO_CODEC, rate=rate, options=options)
            stream.height, stream.width = frames.shape[1:3]
            stream.pix_fmt = PIXEL_FORMAT
            if bitrate is not None:
                stream.bit_rate = int(bitrate)
            for frame_array in frames:
                frame = av.VideoFrame.from_ndarray(frame_array, format="rgb24")
                container.mux(stream.encode(frame))
            container.mux(stream.encode())  # flush the frames the encoder still holds
    except BaseException:
        # atomic_path removed the partial file; the caller keeps the frames (see save_frames_fallback)
        if reserved:
            Path(output_video_path).unlink(missing_ok=True)
        raise
    return output_video_path


def check_output_path(path: str | os.PathLike) -> Path:
    """Check, before any generation, that a video can be written at ``path``; return it as an absolute path.

    Raises ValueError (suffix is not .mp4), IsADirectoryError (path is a directory), FileNotFoundError (its directory
    does not exist), NotADirectoryError (its parent is a file) or PermissionError (not writable), each with a
    one-line message naming the path.
    """
    if Path(path).suffix.lower() != VIDEO_SUFFIX:
        raise ValueError(f"Output path {os.fspath(path)!r} must end in {VIDEO_SUFFIX}")
    return check_writable_file(path, f"a file name ending in {VIDEO_SUFFIX}")


def _raw_frames(frames) -> np.ndarray:
    """The frames as an array without any checks: the fallback must keep even frames export rejected."""
    if _is_torch_tensor(frames):
        return frames.detach().cpu().float().numpy()
    if isinstance(frames, list | tuple) and frames and all(isinstance(f, PIL.Image.Image) for f in frames):
        return np.stack([np.asarray(frame.convert("RGB")) for frame in frames])
    return np.asarray(frames)


def save_frames_fallback(frames, path: str | os.PathLike) -> str:
    """Save frames as a ``.npy`` when the video at ``path`` could not be written; return where they went.

    The file is ``<stem>.frames.npy`` beside ``path``, or in the temporary directory when that directory is not
    writable; when that name is taken, ``<stem>.frames-2.npy``, ``-3`` ... (an earlier fallback is never
    overwritten). It is written under a temporary name and renamed when complete. Valid frames are stored as
    (F, H, W, 3) uint8, which ``export_to_video(np.load(file), ...)`` takes back; anything else is stored as it came.
    """
    try:
        array = frames_to_uint8(frames, name="frames")
    except ValueError:
        array = _raw_frames(frames)
    stem = Path(path).stem
    folders = [Path(path).expanduser().absolute().parent, Path(tempfile.gettempdir())]
    errors = []
    for folder in folders:
        candidate = _free_fallback_name(folder, stem)
        try:
            with atomic_path(candidate) as temporary, open(temporary, "wb") as handle:
                np.save(handle, array)
        except OSError as error:
            errors.append(f"{candidate}: {error}")
            continue
        logger.info("Saved the frames to %s", candidate)  # the caller reports it: the path is returned
        return str(candidate)
    raise OSError("Could not save the frames anywhere: " + "; ".join(errors))


def _free_fallback_name(folder: Path, stem: str) -> Path:
    """``<stem>.frames.npy`` in ``folder``, or the first of ``<stem>.frames-2.npy``, ``-3`` ... not taken."""
    candidate = folder / f"{stem}.frames.npy"
    number = 1
    while candidate.exists() or candidate.is_symlink():
        number += 1
        candidate = folder / f"{stem}.frames-{number}.npy"
    return candidate
