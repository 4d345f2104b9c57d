"""Video and image input/output, with the signatures of diffusers' ``export_to_video`` and ``load_image``."""

from kandinsky5.io.image import load_image
from kandinsky5.io.video import check_output_path, export_to_video, save_frames_fallback

__all__ = ["check_output_path", "export_to_video", "load_image", "save_frames_fallback"]
