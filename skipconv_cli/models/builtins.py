"""Imports every built-in model module so that each registers itself."""
from skipconv_cli.models import yolox  # noqa: F401
from skipconv_cli.models import nanodet  # noqa: F401
from skipconv_cli.models import openpose_mbv2  # noqa: F401
from skipconv_cli.models import hrnet  # noqa: F401
