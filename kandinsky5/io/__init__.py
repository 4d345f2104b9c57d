"""Video and image input/output, with the signatures of diffusers' ``export_to_video`` and ``load_image``; images
are written by ``save_image`` (PNG, JPEG or WebP)."""

from kandinsky5.io.image import load_image
from kandinsky5.io.image_output import check_image_output_path, save_image
from kandinsky5.io.video import check_output_path, export_to_video, save_frames_fallback

__all__ = [
    "check_image_output_path",
    "check_output_path",
    "export_to_video",
    "load_image",
    "save_frames_fallback",
    "save_image",
]
