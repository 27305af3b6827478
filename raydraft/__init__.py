"""raydraft: reward fine-tuning of text-to-image diffusion and flow models.

Importing the package (every raydraft process does, driver, Ray workers and Serve replicas
alike, before diffusers) installs one logging filter, `_not_torchvision_fallback`.
"""

import logging


def _not_torchvision_fallback(record: logging.LogRecord) -> bool:
    """Drops transformers' "`XImageProcessor` requires torchvision (not installed); falling
    back to `XImageProcessorPil`", which diffusers' pipeline modules cause by importing those
    names. raydraft keeps torchvision out of its environment and uses the PIL processors on
    purpose (tests/test_environment.py), so the warning leaves a user nothing to do."""
    return "requires torchvision (not installed); falling back to" not in record.getMessage()


logging.getLogger("transformers.utils.import_utils").addFilter(_not_torchvision_fallback)
