"""M4Fuse: a lightweight state-space / mixture-of-experts 3D U-shaped network for brain-tumour
segmentation, with the data, training and inference code it needs. Knows nothing of Flower."""

__version__ = "0.1.0"
