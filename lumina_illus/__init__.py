"""lumina_illus: continued pretraining of Lumina-Image-2.0 and SDXL on illustration data."""

__version__ = "0.1.0"
