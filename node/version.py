"""The meshllm version, from the installed package metadata."""

from importlib.metadata import PackageNotFoundError, version

try:
    VERSION = version("meshllm")
except PackageNotFoundError:  # running from a source tree that is not installed
    VERSION = "0.0.0+src"
