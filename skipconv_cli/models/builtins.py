"""Imports every built-in model module so that each registers itself."""

from skipconv_cli.models import hrnet, nanodet, openpose_mbv2, yolox  # noqa: F401
